//! A simulated backing disk: per 512-byte sector, the version stamp of the write
//! that last reached it, with a volatile cache.
//!
//! A completed write is visible at once (`current`) but only *stable* once a flush
//! that started after it completes (or when it was FUA). A power loss keeps a random
//! subset of the unstable sector writes (torn writes included); a process crash keeps
//! the cache (the kernel still holds it).

use crate::rng::Rng;

#[derive(Debug, Clone, Copy)]
struct Unstable {
    sector: usize,
    version: u64,
    seq: u64,
}

/// One node's disk.
#[derive(Debug, Clone)]
pub struct SimDisk {
    current: Vec<u64>,
    durable: Vec<u64>,
    /// Unstable sector writes in completion order.
    unstable: Vec<Unstable>,
    next_seq: u64,
}

impl SimDisk {
    /// A disk of `sectors` sectors, all at version 0.
    pub fn new(sectors: usize) -> SimDisk {
        SimDisk {
            current: vec![0; sectors],
            durable: vec![0; sectors],
            unstable: Vec::new(),
            next_seq: 0,
        }
    }

    /// Number of sectors.
    pub fn sectors(&self) -> usize {
        self.current.len()
    }

    /// What a read of `sector` returns now.
    pub fn current(&self, sector: usize) -> u64 {
        self.current[sector]
    }

    /// The whole visible content.
    pub fn content(&self) -> &[u64] {
        &self.current
    }

    /// A completed write of `n` sectors at `first` with `version`.
    pub fn write(&mut self, first: usize, n: usize, version: u64, fua: bool) {
        let range = first..first + n;
        if fua {
            self.unstable.retain(|u| !range.contains(&u.sector));
        }
        for s in range {
            self.current[s] = version;
            if fua {
                self.durable[s] = version;
            } else {
                self.unstable.push(Unstable {
                    sector: s,
                    version,
                    seq: self.next_seq,
                });
            }
        }
        self.next_seq += 1;
    }

    /// The mark a flush submitted now takes: it covers writes completed before it.
    pub fn flush_mark(&self) -> u64 {
        self.next_seq
    }

    /// A flush submitted at `mark` completed: what it covers becomes stable.
    pub fn flush_done(&mut self, mark: u64) {
        let n = self.unstable.iter().take_while(|u| u.seq < mark).count();
        for u in self.unstable.drain(..n) {
            self.durable[u.sector] = u.version;
        }
    }

    /// Sectors that a power loss could lose now.
    pub fn unstable_sectors(&self) -> impl Iterator<Item = usize> + '_ {
        self.unstable.iter().map(|u| u.sector)
    }

    /// The machine crashed. With `power_loss`, each unstable sector write survives
    /// with probability 1/2; otherwise the cache survives (process crash).
    pub fn crash(&mut self, power_loss: bool, rng: &mut Rng) {
        if !power_loss {
            return;
        }
        for u in std::mem::take(&mut self.unstable) {
            if rng.next_u64() & 1 == 0 {
                self.durable[u.sector] = u.version;
            }
        }
        self.current.clone_from(&self.durable);
    }

    /// A resync wrote `version` to `sector`, stable at once.
    pub fn resync(&mut self, sectors: &[(usize, u64)]) {
        if sectors.is_empty() {
            return;
        }
        let mut hit = vec![false; self.current.len()];
        for &(s, v) in sectors {
            hit[s] = true;
            self.current[s] = v;
            self.durable[s] = v;
        }
        self.unstable.retain(|u| !hit[u.sector]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_and_fua_make_writes_survive_a_power_loss() {
        let mut d = SimDisk::new(8);
        d.write(0, 2, 1, false);
        let mark = d.flush_mark();
        d.write(2, 1, 2, false);
        d.flush_done(mark);
        d.write(3, 1, 3, true);
        d.write(4, 1, 4, false);
        // Sector 4 may or may not survive; 0..4 must.
        let mut rng = Rng::new(1);
        d.crash(true, &mut rng);
        assert_eq!(&d.content()[..2], &[1, 1]);
        assert_eq!(d.current(3), 3);
        assert!(d.current(2) == 2 || d.current(2) == 0);
        assert!(d.current(4) == 4 || d.current(4) == 0);
    }

    #[test]
    fn a_fua_write_is_not_undone_by_an_older_cached_write() {
        let mut d = SimDisk::new(2);
        d.write(0, 1, 1, false);
        d.write(0, 1, 2, true);
        for seed in 0..8 {
            let mut c = d.clone();
            c.crash(true, &mut Rng::new(seed));
            assert_eq!(c.current(0), 2);
        }
    }
}
