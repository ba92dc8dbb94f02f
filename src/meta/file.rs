//! File-level meta-data operations (synchronous `std::fs`): `create-md`, reading and
//! writing the superblock, `wipe-md`, file-system detection, `dump-md` output.
//!
//! They work on regular files (sizes from `stat`) and block devices (sizes from the
//! `BLKGETSIZE64` ioctl). Every write that must survive a crash is durable before
//! the function returns: fdatasync, or `RWF_DSYNC` on its own range
//! ([`MetaData::write_region_durable`]), which is not a data barrier.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::al;
use super::error::{MetaError, Place};
use super::layout::{Layout, MetaLocation, SUPERBLOCK_SIZE_BYTES};
use super::superblock::{flags, MetaKind, Superblock, SUPERBLOCK_MAGIC};
use super::uuid::{format_uuid, random_uuid};

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`: size of a block device in bytes. The
/// encoding (dir 2 << 30 | size 8 << 16 | 0x12 << 8 | 114) holds on x86_64 and aarch64.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// Options of `create-md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Overwrite existing meta-data or a file system in the data area.
    pub force: bool,
    /// Activity-log capacity in 4 MiB extents.
    pub al_extents: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            force: false,
            al_extents: al::AL_DEFAULT_EXTENTS,
        }
    }
}

/// Meta-data read from (or written to) a device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetaData {
    /// The layout computed from the current device sizes (equal to the superblock's).
    pub layout: Layout,
    /// The superblock.
    pub superblock: Superblock,
    /// The device holding the meta-data (the backing disk for internal meta-data).
    pub md_path: PathBuf,
    /// The backing disk.
    pub disk_path: PathBuf,
}

/// Size in bytes of a regular file or block device.
pub fn device_size_bytes(path: &Path) -> Result<u64, MetaError> {
    let file = File::open(path).map_err(|e| MetaError::io("open", path, e))?;
    size_of_open(&file, path)
}

fn size_of_open(file: &File, path: &Path) -> Result<u64, MetaError> {
    let metadata = file
        .metadata()
        .map_err(|e| MetaError::io("stat", path, e))?;
    let file_type = metadata.file_type();
    if file_type.is_file() {
        return Ok(metadata.len());
    }
    if file_type.is_block_device() {
        let mut size_bytes: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a
        // live, properly aligned u64; the fd is open for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size_bytes) };
        if rc != 0 {
            return Err(MetaError::io(
                "get the size (BLKGETSIZE64) of",
                path,
                std::io::Error::last_os_error(),
            ));
        }
        return Ok(size_bytes);
    }
    Err(MetaError::InvalidArgument(format!(
        "{} is neither a regular file nor a block device",
        path.display()
    )))
}

/// The device holding the meta-data for `disk` and `meta`.
fn md_path_of(disk: &Path, meta: &MetaLocation) -> PathBuf {
    match meta {
        MetaLocation::Internal => disk.to_path_buf(),
        MetaLocation::External { path, .. } => path.clone(),
    }
}

/// Computes the layout from the current sizes; errors name the device.
fn layout_for(disk: &Path, meta: &MetaLocation) -> Result<Layout, MetaError> {
    let backing_size_bytes = device_size_bytes(disk)?;
    let md_path = md_path_of(disk, meta);
    let md_size_bytes = match meta {
        MetaLocation::Internal => backing_size_bytes,
        MetaLocation::External { path, .. } => device_size_bytes(path)?,
    };
    Layout::compute(backing_size_bytes, meta, md_size_bytes).map_err(|e| match e {
        MetaError::TooSmall {
            what,
            size_bytes,
            needed_bytes,
            ..
        } => {
            let path = if what == "backing disk" {
                disk
            } else {
                &md_path
            };
            MetaError::TooSmall {
                what,
                place: Place::on(path),
                size_bytes,
                needed_bytes,
            }
        }
        other => other,
    })
}

fn open_rw(path: &Path) -> Result<File, MetaError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| MetaError::io("open for writing", path, e))
}

fn open_ro(path: &Path) -> Result<File, MetaError> {
    File::open(path).map_err(|e| MetaError::io("open", path, e))
}

fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset_bytes: u64,
) -> Result<(), MetaError> {
    file.read_exact_at(buf, offset_bytes)
        .map_err(|e| MetaError::io("read", path, e))
}

fn write_all_at(file: &File, path: &Path, buf: &[u8], offset_bytes: u64) -> Result<(), MetaError> {
    file.write_all_at(buf, offset_bytes)
        .map_err(|e| MetaError::io("write", path, e))
}

fn sync(file: &File, path: &Path) -> Result<(), MetaError> {
    file.sync_data().map_err(|e| MetaError::io("sync", path, e))
}

/// Reads as much as possible of `buf.len()` bytes at `offset_bytes`; returns the count
/// (short at the end of the file).
fn read_up_to(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset_bytes: u64,
) -> Result<usize, MetaError> {
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset_bytes + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(MetaError::io("read", path, e)),
        }
    }
    Ok(done)
}

/// Zeroes `[offset, offset+len)`: punches a hole in a regular file (keeps a sparse file
/// sparse), writes zeros on a block device or when hole punching is unsupported.
fn zero_range(
    file: &File,
    path: &Path,
    offset_bytes: u64,
    len_bytes: u64,
) -> Result<(), MetaError> {
    let is_file = file
        .metadata()
        .map_err(|e| MetaError::io("stat", path, e))?
        .is_file();
    if is_file {
        let (Ok(offset), Ok(len)) = (
            libc::off_t::try_from(offset_bytes),
            libc::off_t::try_from(len_bytes),
        ) else {
            return Err(MetaError::InvalidArgument(format!(
                "range at {offset_bytes}+{len_bytes} does not fit off_t"
            )));
        };
        // SAFETY: plain syscall on an open fd with integer arguments.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(MetaError::io("punch a hole in", path, err));
        }
    }
    const CHUNK_BYTES: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK_BYTES as usize];
    let mut done_bytes = 0u64;
    while done_bytes < len_bytes {
        let n = (len_bytes - done_bytes).min(CHUNK_BYTES);
        write_all_at(file, path, &zeros[..n as usize], offset_bytes + done_bytes)?;
        done_bytes += n;
    }
    Ok(())
}

fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Creates meta-data: zeroed bitmap (nothing out of sync) and activity log, and a
/// superblock in state Inconsistent with current UUID `UUID_JUST_CREATED` (4).
///
/// Refuses, unless `opts.force`, when rdb meta-data already exists at the location
/// ([`MetaError::AlreadyExists`]) or the data area holds a file system
/// ([`MetaError::HoldsFilesystem`]).
pub fn create_md(
    disk: &Path,
    meta: &MetaLocation,
    opts: &CreateOptions,
) -> Result<MetaData, MetaError> {
    let layout = layout_for(disk, meta)?;
    let max_extents = al::max_al_extents(layout.data_size_bytes);
    if opts.al_extents < al::AL_MIN_EXTENTS || opts.al_extents > max_extents {
        return Err(MetaError::InvalidArgument(format!(
            "al-extents {} out of range {}..={max_extents}",
            opts.al_extents,
            al::AL_MIN_EXTENTS
        )));
    }
    let md_path = md_path_of(disk, meta);
    let file = open_rw(&md_path)?;
    if !opts.force {
        let mut block = [0u8; 4096];
        read_exact_at(&file, &md_path, &mut block, layout.superblock_offset_bytes)?;
        if block[0..8] == SUPERBLOCK_MAGIC {
            return Err(MetaError::AlreadyExists {
                place: Place::at(&md_path, layout.superblock_offset_bytes),
            });
        }
        if let Some(fs) = detect_filesystem(disk, 0)? {
            return Err(MetaError::HoldsFilesystem {
                path: disk.to_path_buf(),
                fs,
                offset_bytes: 0,
            });
        }
        if md_path != disk {
            if let Some(fs) = detect_filesystem(&md_path, layout.md_device_offset_bytes)? {
                return Err(MetaError::HoldsFilesystem {
                    path: md_path,
                    fs,
                    offset_bytes: layout.md_device_offset_bytes,
                });
            }
        }
    }
    zero_range(
        &file,
        &md_path,
        layout.al_offset_bytes,
        layout.al_size_bytes,
    )?;
    zero_range(
        &file,
        &md_path,
        layout.bitmap_offset_bytes,
        layout.bitmap_size_bytes,
    )?;
    sync(&file, &md_path)?;
    let superblock = Superblock::new(layout, meta, opts.al_extents, random_uuid(), now_unix_s());
    let md = MetaData {
        layout,
        superblock,
        md_path,
        disk_path: disk.to_path_buf(),
    };
    write_superblock(&md)?;
    Ok(md)
}

/// Reads and checks the meta-data of `disk` at `meta`: the superblock (magic, version,
/// checksum, fields), its layout against the current sizes, and after an unclean
/// shutdown the recoverability of the activity log ([`MetaError::AlUnrecoverable`]).
pub fn read_md(disk: &Path, meta: &MetaLocation) -> Result<MetaData, MetaError> {
    let layout = layout_for(disk, meta)?;
    let md_path = md_path_of(disk, meta);
    let file = open_ro(&md_path)?;
    let mut block = [0u8; 4096];
    read_exact_at(&file, &md_path, &mut block, layout.superblock_offset_bytes)?;
    let place = Place::at(&md_path, layout.superblock_offset_bytes);
    let superblock = Superblock::decode(&block).map_err(|e| e.with_place(place.clone()))?;
    let (kind, index) = MetaKind::of(meta);
    let r = &superblock.layout;
    let checks = [
        ("data size", r.data_size_bytes, layout.data_size_bytes),
        (
            "meta-data offset",
            r.md_device_offset_bytes,
            layout.md_device_offset_bytes,
        ),
        (
            "superblock offset",
            r.superblock_offset_bytes,
            layout.superblock_offset_bytes,
        ),
        (
            "bitmap offset",
            r.bitmap_offset_bytes,
            layout.bitmap_offset_bytes,
        ),
        ("bitmap size", r.bitmap_size_bytes, layout.bitmap_size_bytes),
        (
            "activity log offset",
            r.al_offset_bytes,
            layout.al_offset_bytes,
        ),
        ("activity log size", r.al_size_bytes, layout.al_size_bytes),
        (
            "meta-data kind (0 internal, 1 indexed, 2 flexible)",
            u64::from(superblock.meta_kind as u32),
            u64::from(kind as u32),
        ),
        (
            "slot index",
            u64::from(superblock.meta_index),
            u64::from(index),
        ),
    ];
    for (field, recorded, computed) in checks {
        if recorded != computed {
            return Err(MetaError::LayoutMismatch {
                place,
                field,
                recorded,
                computed,
            });
        }
    }
    let md = MetaData {
        layout,
        superblock,
        md_path,
        disk_path: disk.to_path_buf(),
    };
    if !md.superblock.has_flag(flags::AL_CLEAN) {
        // After an unclean shutdown the activity log must say what was hot; refuse
        // meta-data whose log cannot (see `meta::recovery`).
        super::recovery::recover_al(&md)?;
    }
    Ok(md)
}

/// Writes `md.superblock` durably (`RWF_DSYNC` on its 4 KiB, see
/// [`MetaData::write_region_durable`]: not a data barrier).
pub fn write_superblock(md: &MetaData) -> Result<(), MetaError> {
    let place = Place::at(&md.md_path, md.layout.superblock_offset_bytes);
    md.superblock.check().map_err(|reason| MetaError::Corrupt {
        what: "superblock",
        place: place.clone(),
        reason,
    })?;
    if md.superblock.layout != md.layout {
        return Err(MetaError::InvalidArgument(
            "superblock layout differs from the meta-data layout".to_string(),
        ));
    }
    let file = open_rw(&md.md_path)?;
    md.write_region_durable(
        &file,
        &md.superblock.encode(),
        md.layout.superblock_offset_bytes,
    )
}

/// Destroys the meta-data: zeroes the superblock and the activity log (durably).
pub fn wipe_md(disk: &Path, meta: &MetaLocation) -> Result<(), MetaError> {
    let layout = layout_for(disk, meta)?;
    let md_path = md_path_of(disk, meta);
    let file = open_rw(&md_path)?;
    let zeros = vec![0u8; (SUPERBLOCK_SIZE_BYTES + layout.al_size_bytes) as usize];
    write_all_at(
        &file,
        &md_path,
        &zeros[..SUPERBLOCK_SIZE_BYTES as usize],
        layout.superblock_offset_bytes,
    )?;
    write_all_at(
        &file,
        &md_path,
        &zeros[..layout.al_size_bytes as usize],
        layout.al_offset_bytes,
    )?;
    sync(&file, &md_path)
}

/// Looks for a known signature at `data_offset` of `disk`: ext2/3/4, xfs, btrfs, swap,
/// LUKS, LVM2, rdb meta-data, a GPT or DOS partition table. Returns its name.
pub fn detect_filesystem(disk: &Path, data_offset: u64) -> Result<Option<String>, MetaError> {
    let file = open_ro(disk)?;
    let mut buf = vec![0u8; 0x10000 + 0x48];
    let len = read_up_to(&file, disk, &mut buf, data_offset)?;
    Ok(identify(&buf[..len]).map(str::to_string))
}

fn le_u16(buf: &[u8], offset: usize) -> Option<u16> {
    let bytes = buf.get(offset..offset + 2)?;
    Some(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn le_u32(buf: &[u8], offset: usize) -> Option<u32> {
    let bytes = buf.get(offset..offset + 4)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn has(buf: &[u8], offset: usize, magic: &[u8]) -> bool {
    buf.get(offset..offset + magic.len()) == Some(magic)
}

/// Identifies a signature at the start of `buf`.
fn identify(buf: &[u8]) -> Option<&'static str> {
    if has(buf, 0, &SUPERBLOCK_MAGIC) {
        return Some("rdb meta-data");
    }
    if le_u16(buf, 1080) == Some(0xEF53) {
        // ext superblock at 1024: compat at +92, incompat at +96.
        let compat = le_u32(buf, 1024 + 92).unwrap_or(0);
        let incompat = le_u32(buf, 1024 + 96).unwrap_or(0);
        const INCOMPAT_EXT4: u32 = 0x40 | 0x80 | 0x200; // extents, 64bit, flex_bg
        const COMPAT_HAS_JOURNAL: u32 = 0x4;
        return Some(if incompat & INCOMPAT_EXT4 != 0 {
            "ext4"
        } else if compat & COMPAT_HAS_JOURNAL != 0 {
            "ext3"
        } else {
            "ext2"
        });
    }
    if has(buf, 0, b"XFSB") {
        return Some("xfs");
    }
    if has(buf, 0x10040, b"_BHRfS_M") {
        return Some("btrfs");
    }
    if has(buf, 0, b"LUKS\xba\xbe") {
        return Some("LUKS");
    }
    if has(buf, 4086, b"SWAPSPACE2") || has(buf, 4086, b"SWAP-SPACE") {
        return Some("swap");
    }
    if has(buf, 512 + 24, b"LVM2 001") {
        return Some("LVM2 physical volume");
    }
    if has(buf, 512, b"EFI PART") {
        return Some("a GPT partition table");
    }
    if has(buf, 3, b"NTFS    ") {
        return Some("ntfs");
    }
    if has(buf, 82, b"FAT32   ") || has(buf, 54, b"FAT16   ") || has(buf, 54, b"FAT12   ") {
        return Some("vfat");
    }
    if has(buf, 510, &[0x55, 0xAA]) {
        return Some("a DOS partition table or boot sector");
    }
    None
}

impl MetaData {
    /// Text in the spirit of `drbdmeta dump-md` (the bitmap itself is not included).
    pub fn dump_text(&self) -> String {
        let sb = &self.superblock;
        let l = &self.layout;
        let u = &sb.uuids;
        let flag_names = flags::names(sb.flags);
        let mut out = String::new();
        out.push_str("# rdb meta-data\n");
        out.push_str("version \"rdb-v1\";\n\n");
        out.push_str(&format!("# disk {}\n", self.disk_path.display()));
        out.push_str(&format!("# meta-disk {}\n", self.md_path.display()));
        out.push_str(&format!(
            "# meta-kind {:?} index {}\n",
            sb.meta_kind, sb.meta_index
        ));
        out.push_str(&format!("# md_offset {}\n", l.md_device_offset_bytes));
        out.push_str(&format!("# md_size {}\n", l.md_size_bytes()));
        out.push_str(&format!("# bm_offset {}\n", l.bitmap_offset_bytes));
        out.push_str(&format!("# bm_size {}\n", l.bitmap_size_bytes));
        out.push_str(&format!("# al_offset {}\n", l.al_offset_bytes));
        out.push_str(&format!("# al_size {}\n", l.al_size_bytes));
        out.push_str(&format!("# sb_offset {}\n\n", l.superblock_offset_bytes));
        out.push_str("uuid {\n");
        out.push_str(&format!(
            "\t{}; {}; {}; {};\n",
            format_uuid(u.current),
            format_uuid(u.bitmap),
            format_uuid(u.history[0]),
            format_uuid(u.history[1])
        ));
        out.push_str(&format!(
            "\tflags 0x{:08X}; # {}\n",
            sb.flags,
            if flag_names.is_empty() {
                "none (Inconsistent)".to_string()
            } else {
                flag_names.join(", ")
            }
        ));
        out.push_str("}\n");
        out.push_str(&format!("data-size {};\n", l.data_size_bytes));
        out.push_str(&format!("al-extents {};\n", sb.al_extents));
        out.push_str(&format!("al-extent-size {};\n", sb.al_extent_size_bytes));
        out.push_str(&format!("al-tr-number {};\n", sb.al_tr_number));
        out.push_str(&format!("bm-byte-per-bit {};\n", sb.bytes_per_bit));
        out.push_str(&format!("device-uuid {};\n", format_uuid(sb.device_uuid)));
        out.push_str(&format!(
            "peer-name-hash {};\n",
            format_uuid(sb.peer_name_hash)
        ));
        out.push_str(&format!("created {};\n", sb.created_unix_s));
        out
    }

    /// JSON form (layout, superblock with hex UUIDs and flag names, paths).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    /// Opens the meta-data device for reading and writing.
    pub fn open_rw(&self) -> Result<File, MetaError> {
        open_rw(&self.md_path)
    }

    /// Reads `buf.len()` bytes at `offset_bytes` of the meta-data device.
    pub fn read_region(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), MetaError> {
        let file = open_ro(&self.md_path)?;
        read_exact_at(&file, &self.md_path, buf, offset_bytes)
    }

    /// Writes `buf` at `offset_bytes` of the meta-data device through `file` (from
    /// [`MetaData::open_rw`]), without syncing.
    pub fn write_region(
        &self,
        file: &File,
        buf: &[u8],
        offset_bytes: u64,
    ) -> Result<(), MetaError> {
        write_all_at(file, &self.md_path, buf, offset_bytes)
    }

    /// Writes `buf` at `offset_bytes` through `file` and makes that range durable
    /// before returning (`pwritev2` with `RWF_DSYNC`; pwrite + fdatasync where the
    /// kernel refuses the flag). Unlike [`MetaData::sync`], it does not write back
    /// the rest of the file: with internal meta-data an fdatasync of the backing file
    /// also forces out every dirty data page. It is **not** a data barrier: a caller
    /// whose write must not be durable before some data (an activity-log transaction
    /// that evicts extents, cleared bitmap bits, a superblock that becomes Consistent)
    /// flushes the data first (`docs/metadata.md`, "Write ordering").
    pub fn write_region_durable(
        &self,
        file: &File,
        buf: &[u8],
        offset_bytes: u64,
    ) -> Result<(), MetaError> {
        crate::storage::sys::write_all_at(file, buf, offset_bytes, true)
            .map_err(|e| MetaError::io("write", &self.md_path, e))
    }

    /// fdatasync of `file` (from [`MetaData::open_rw`]).
    pub fn sync(&self, file: &File) -> Result<(), MetaError> {
        sync(file, &self.md_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_signatures() {
        let mut buf = vec![0u8; 0x10048];
        assert_eq!(identify(&buf), None);
        buf[1080] = 0x53;
        buf[1081] = 0xEF;
        assert_eq!(identify(&buf), Some("ext2"));
        buf[1024 + 92] = 0x4;
        assert_eq!(identify(&buf), Some("ext3"));
        buf[1024 + 96] = 0x40;
        assert_eq!(identify(&buf), Some("ext4"));
        let mut buf = vec![0u8; 0x10048];
        buf[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        assert_eq!(identify(&buf), Some("btrfs"));
        assert_eq!(identify(&buf[..100]), None);
        assert_eq!(identify(b"XFSB"), Some("xfs"));
        assert_eq!(identify(b"RDBMETA1"), Some("rdb meta-data"));
    }
}
