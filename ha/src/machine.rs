//! The membership and resource-group state machine of `rdb-ha`, sans I/O.
//!
//! [`Machine::handle`] takes the time (milliseconds on any monotonic clock) and one
//! [`Event`] (an authenticated packet, a timer tick, a resource or fence result, an admin
//! command, a health check or ping result) and returns the [`Action`]s to perform. It
//! owns every decision: who is alive (per link, deadtime, initdead), who should run the
//! group, when to start or stop which resource, when to fence, what to announce.
//!
//! Rules (see `docs/ha.md`): the group runs on one node; nodes are ranked by
//! eligibility tier (0: normal, 1: standby, none: failed or cut off from the ping nodes),
//! then preferred node first, then `node` order. A node that holds nothing starts the
//! group when it is the best ranked live node, no live node holds any resource, every
//! node has been heard from or declared dead (initdead at boot) and every dead node that
//! might hold resources has been fenced (when a fence hook is configured). A holder
//! releases the group when a better tier exists, when auto_failback is on and the live,
//! eligible preferred node is someone else, or when another node is also active and
//! ranks better (split brain healed). Resources start in order and stop in reverse; a
//! failed start rolls back what started and marks the node failed so another node tries.

use rdb_protocol::heartbeat::{
    AuthAlg, NodeState, Packet, PacketType, FLAG_FAILED, FLAG_PING_LOST, FLAG_STANDBY,
};

/// Static parameters of the machine (from the configuration).
#[derive(Debug, Clone)]
pub struct Params {
    /// This node's name.
    pub node: String,
    /// Every node, in `ha.cf` order (includes this node).
    pub nodes: Vec<String>,
    /// Preferred node of the group.
    pub preferred: String,
    /// Resource names, in start order (for logs and status).
    pub resources: Vec<String>,
    /// Link names (interfaces), indexed by the `link` of [`Event::Packet`].
    pub links: Vec<String>,
    /// Heartbeat interval.
    pub keepalive_ms: u64,
    /// Silence that declares a node dead.
    pub deadtime_ms: u64,
    /// Heartbeat interval that is logged as late.
    pub warntime_ms: u64,
    /// Deadtime for nodes not heard from since boot.
    pub initdead_ms: u64,
    /// Give the group back to the preferred node when it returns.
    pub auto_failback: bool,
    /// A fence hook is configured.
    pub fence: bool,
    /// Ping nodes are configured (the tie-breaker).
    pub ping: bool,
    /// Health checks: (name, fall, rise).
    pub checks: Vec<(String, u32, u32)>,
    /// Random per process start.
    pub generation: u64,
}

/// A resource operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Start.
    Start,
    /// Stop.
    Stop,
}

/// Log severity of [`Action::Log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Normal event.
    Info,
    /// Something late or degraded.
    Warn,
    /// Something failed.
    Error,
}

/// Input of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Timer tick (the daemon ticks at least every keepalive/4).
    Tick,
    /// An authenticated, non-replayed packet received on link `link`.
    Packet {
        /// Link index.
        link: usize,
        /// The packet.
        packet: Packet,
    },
    /// Result of an [`Action::Resource`].
    ResourceDone {
        /// Resource index.
        index: usize,
        /// Operation.
        op: Op,
        /// Success.
        ok: bool,
    },
    /// Result of an [`Action::Fence`].
    FenceDone {
        /// Fenced node.
        node: String,
        /// Success.
        ok: bool,
    },
    /// Admin `standby`: give the group to another node.
    AdminStandby,
    /// Admin `takeover`: pull the group here (clears standby and failed).
    AdminTakeover,
    /// One health check probe result.
    Check {
        /// Check index.
        index: usize,
        /// Healthy.
        ok: bool,
    },
    /// Ping nodes reachability (any answered).
    Ping {
        /// Reachable.
        reachable: bool,
    },
    /// Clean shutdown: release the group, announce, exit.
    Shutdown,
}

/// Output of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Sign and send this packet on every link.
    Send(Packet),
    /// Run a resource operation and report [`Event::ResourceDone`].
    Resource {
        /// Resource index.
        index: usize,
        /// Operation.
        op: Op,
    },
    /// Run the fence hook for `node` and report [`Event::FenceDone`].
    Fence(String),
    /// Log a message.
    Log(Level, String),
    /// Shutdown complete: exit the process.
    Exit,
}

/// Liveness of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Not heard since boot, initdead not expired.
    Unknown,
    /// Heard within deadtime.
    Alive,
    /// Silent for deadtime (or initdead), or sent a shutdown notice.
    Dead,
}

/// State of one resource, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResState {
    /// Not running.
    Stopped,
    /// Start in progress.
    Starting,
    /// Running.
    Started,
    /// Stop in progress.
    Stopping,
    /// Last operation failed.
    Failed,
}

#[derive(Debug, Clone)]
struct Peer {
    name: String,
    index: usize,
    liveness: Liveness,
    link_last_ms: Vec<Option<u64>>,
    link_up: Vec<bool>,
    last_ms: Option<u64>,
    state: NodeState,
    flags: u8,
    owner: String,
    generation: Option<u64>,
    needs_fence: bool,
    fence_retry_ms: u64,
    /// A split brain with this peer (both holding the group) was reported; cleared
    /// once either side holds nothing.
    split_brain_logged: bool,
}

/// Status of one link of a peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkStatus {
    /// Interface.
    pub name: String,
    /// Heard within deadtime.
    pub up: bool,
    /// Time since the last packet on this link.
    pub last_heartbeat_age_ms: Option<u64>,
}

/// Status of one peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerStatus {
    /// Node name.
    pub name: String,
    /// Liveness.
    pub liveness: Liveness,
    /// Its announced state.
    pub state: &'static str,
    /// Announced standby flag.
    pub standby: bool,
    /// Announced failed flag.
    pub failed: bool,
    /// Announced ping-lost flag.
    pub ping_lost: bool,
    /// Time since the last packet on any link.
    pub last_heartbeat_age_ms: Option<u64>,
    /// Links.
    pub links: Vec<LinkStatus>,
    /// Waiting for a successful fence before takeover.
    pub needs_fence: bool,
}

/// Status of one resource.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResourceStatus {
    /// As written in haresources.
    pub name: String,
    /// Local state.
    pub state: ResState,
}

/// Snapshot of the machine for `rdb-ha status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// This node.
    pub node: String,
    /// Process generation.
    pub generation: String,
    /// Local state.
    pub state: &'static str,
    /// Who owns the group, as seen from here (empty: nobody).
    pub owner: String,
    /// Preferred node.
    pub preferred: String,
    /// Local standby flag.
    pub standby: bool,
    /// Local failed flag (start failed or health check failed).
    pub failed: bool,
    /// Ping nodes unreachable.
    pub ping_lost: bool,
    /// A resource stop failed: resources may still run here.
    pub unclean: bool,
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// Resources.
    pub resources: Vec<ResourceStatus>,
    /// Health checks (name, failed).
    pub checks: Vec<(String, bool)>,
}

#[derive(Debug, Clone, Default)]
struct CheckTrack {
    fails: u32,
    oks: u32,
    failed: bool,
}

/// The state machine.
#[derive(Debug)]
pub struct Machine {
    p: Params,
    me: usize,
    boot_ms: Option<u64>,
    peers: Vec<Peer>,
    state: NodeState,
    res: Vec<ResState>,
    started: usize,
    pending: Option<(usize, Op)>,
    standby: bool,
    start_failed: bool,
    ping_lost: bool,
    /// A ping result arrived (until then this node does not start the group, and
    /// does not announce itself cut off either: other nodes keep ranking it).
    ping_known: bool,
    /// Last answer of a ping node.
    ping_ok_ms: Option<u64>,
    /// The ping nodes came back at this time. Peers this node declared dead while it was
    /// cut off were most likely cut off from it by the same fault, not dead: until
    /// `deadtime` has passed since then, a dead peer's resources are not taken over
    /// (a healed cut would otherwise make both nodes start the group at once).
    ping_regained_ms: Option<u64>,
    unclean: bool,
    stop_had_failure: bool,
    checks: Vec<CheckTrack>,
    seq: u64,
    next_send_ms: u64,
    takeover_pending: bool,
    fence_inflight: Option<String>,
    shutting_down: bool,
    exited: bool,
    last_owner: Option<String>,
}

fn log(out: &mut Vec<Action>, level: Level, msg: impl Into<String>) {
    out.push(Action::Log(level, msg.into()));
}

impl Machine {
    /// A machine for `p`. Panics-free: an inconsistent `p` (node not listed) is
    /// reported as an error.
    pub fn new(p: Params) -> Result<Machine, String> {
        let me = p
            .nodes
            .iter()
            .position(|n| *n == p.node)
            .ok_or_else(|| format!("node '{}' is not in the node list", p.node))?;
        if !p.nodes.contains(&p.preferred) {
            return Err(format!(
                "preferred node '{}' is not in the node list",
                p.preferred
            ));
        }
        if p.links.is_empty() {
            return Err("no link".into());
        }
        let peers = p
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != me)
            .map(|(index, name)| Peer {
                name: name.clone(),
                index,
                liveness: Liveness::Unknown,
                link_last_ms: vec![None; p.links.len()],
                link_up: vec![false; p.links.len()],
                last_ms: None,
                state: NodeState::Standby,
                flags: 0,
                owner: String::new(),
                generation: None,
                needs_fence: false,
                fence_retry_ms: 0,
                split_brain_logged: false,
            })
            .collect();
        Ok(Machine {
            me,
            boot_ms: None,
            peers,
            state: NodeState::Standby,
            res: vec![ResState::Stopped; p.resources.len()],
            started: 0,
            pending: None,
            standby: false,
            start_failed: false,
            ping_lost: false,
            ping_known: false,
            ping_ok_ms: None,
            ping_regained_ms: None,
            unclean: false,
            stop_had_failure: false,
            checks: vec![CheckTrack::default(); p.checks.len()],
            seq: 0,
            next_send_ms: 0,
            takeover_pending: false,
            fence_inflight: None,
            shutting_down: false,
            exited: false,
            last_owner: None,
            p,
        })
    }

    /// Local state.
    pub fn state(&self) -> NodeState {
        self.state
    }

    /// True once [`Action::Exit`] was returned.
    pub fn exited(&self) -> bool {
        self.exited
    }

    fn check_failed(&self) -> bool {
        self.checks.iter().any(|c| c.failed)
    }

    fn flags(&self) -> u8 {
        let mut f = 0;
        if self.standby {
            f |= FLAG_STANDBY;
        }
        if self.start_failed || self.check_failed() || self.unclean {
            f |= FLAG_FAILED;
        }
        if self.p.ping && self.ping_lost {
            f |= FLAG_PING_LOST;
        }
        f
    }

    fn tier(flags: u8) -> Option<u8> {
        if flags & (FLAG_FAILED | FLAG_PING_LOST) != 0 {
            None
        } else if flags & FLAG_STANDBY != 0 {
            Some(1)
        } else {
            Some(0)
        }
    }

    fn rank(&self, index: usize, tier: u8) -> (u8, bool, usize) {
        (tier, self.p.nodes[index] != self.p.preferred, index)
    }

    /// Best ranked live eligible node: (node index, tier).
    fn candidate(&self) -> Option<(usize, u8)> {
        let mut best: Option<(usize, u8)> = Self::tier(self.flags()).map(|t| (self.me, t));
        for pe in self.peers.iter().filter(|p| p.liveness == Liveness::Alive) {
            if let Some(t) = Self::tier(pe.flags) {
                let better = match best {
                    None => true,
                    Some((bi, bt)) => self.rank(pe.index, t) < self.rank(bi, bt),
                };
                if better {
                    best = Some((pe.index, t));
                }
            }
        }
        best
    }

    /// Who owns the group, as seen from here.
    pub fn owner(&self) -> String {
        if self.state == NodeState::Active {
            return self.p.node.clone();
        }
        self.peers
            .iter()
            .find(|p| p.liveness == Liveness::Alive && p.state == NodeState::Active)
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }

    fn packet(&mut self, now_ms: u64, kind: PacketType) -> Packet {
        self.seq += 1;
        Packet {
            kind,
            alg: AuthAlg::Sha256,
            key_index: 0,
            generation: self.p.generation,
            seq: self.seq,
            timestamp_ms: now_ms,
            state: self.state,
            flags: self.flags(),
            sender: self.p.node.clone(),
            owner: self.owner(),
        }
    }

    fn send(&mut self, now_ms: u64, kind: PacketType, out: &mut Vec<Action>) {
        let pk = self.packet(now_ms, kind);
        out.push(Action::Send(pk));
    }

    fn set_state(&mut self, now_ms: u64, s: NodeState, out: &mut Vec<Action>) {
        if self.state != s {
            self.state = s;
            if !s.holds_resources() {
                // A later overlap is a new split brain, reported again.
                self.peers
                    .iter_mut()
                    .for_each(|p| p.split_brain_logged = false);
            }
            if s == NodeState::Active {
                self.last_owner = Some(self.p.node.clone());
            }
            self.send(now_ms, PacketType::ResourceState, out);
        }
    }

    /// Handles one event at time `now_ms` and returns what to do.
    pub fn handle(&mut self, now_ms: u64, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if self.exited {
            return out;
        }
        let boot = *self.boot_ms.get_or_insert(now_ms);
        match ev {
            Event::Tick => self.on_tick(now_ms, boot, &mut out),
            Event::Packet { link, packet } => self.on_packet(now_ms, link, packet, &mut out),
            Event::ResourceDone { index, op, ok } => {
                self.on_resource(now_ms, index, op, ok, &mut out)
            }
            Event::FenceDone { node, ok } => self.on_fence(now_ms, &node, ok, &mut out),
            Event::AdminStandby => {
                if !self.standby {
                    log(&mut out, Level::Info, "Going standby (admin request)");
                    self.standby = true;
                }
                self.takeover_pending = false;
                if self.unclean {
                    self.retry_unclean(now_ms, &mut out);
                }
                self.send(now_ms, PacketType::Standby, &mut out);
            }
            Event::AdminTakeover => {
                log(
                    &mut out,
                    Level::Info,
                    "Takeover requested (admin): asking other nodes to stand by",
                );
                self.standby = false;
                self.start_failed = false;
                for c in &mut self.checks {
                    *c = CheckTrack::default();
                }
                if self.unclean {
                    self.retry_unclean(now_ms, &mut out);
                }
                self.takeover_pending = true;
                self.send(now_ms, PacketType::TakeoverRequest, &mut out);
            }
            Event::Check { index, ok } => self.on_check(index, ok, &mut out),
            Event::Ping { reachable } => {
                // Like ipfail's deadping: the ping nodes are lost after `deadtime`
                // without an answer (at once when the first probe fails).
                let first = !self.ping_known;
                self.ping_known = true;
                if reachable {
                    self.ping_ok_ms = Some(now_ms);
                }
                let lost = if reachable {
                    false
                } else if first
                    || self
                        .ping_ok_ms
                        .is_none_or(|t| now_ms.saturating_sub(t) >= self.p.deadtime_ms)
                {
                    true
                } else {
                    self.ping_lost
                };
                if self.p.ping && self.ping_lost != lost {
                    self.ping_lost = lost;
                    if !lost {
                        self.ping_regained_ms = Some(now_ms);
                    }
                    let lvl = if reachable { Level::Info } else { Level::Warn };
                    log(
                        &mut out,
                        lvl,
                        format!(
                            "Ping nodes {}",
                            if reachable {
                                "reachable"
                            } else {
                                "unreachable"
                            }
                        ),
                    );
                    self.send(now_ms, PacketType::Heartbeat, &mut out);
                }
            }
            Event::Shutdown => {
                if !self.shutting_down {
                    log(
                        &mut out,
                        Level::Info,
                        "Shutting down: giving up all HA resources",
                    );
                    self.shutting_down = true;
                }
            }
        }
        self.reconcile(now_ms, &mut out);
        out
    }

    fn retry_unclean(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        log(out, Level::Info, "Retrying the release of every resource");
        self.unclean = false;
        self.stop_had_failure = false;
        self.start_failed = true;
        self.begin_stop(now_ms, self.res.len(), out);
    }

    fn on_tick(&mut self, now_ms: u64, boot: u64, out: &mut Vec<Action>) {
        let deadtime = self.p.deadtime_ms;
        let links = self.p.links.clone();
        let fence = self.p.fence;
        for pe in &mut self.peers {
            for (l, last) in pe.link_last_ms.iter().enumerate() {
                if pe.link_up[l] && last.is_some_and(|t| now_ms.saturating_sub(t) > deadtime) {
                    pe.link_up[l] = false;
                    log(
                        out,
                        Level::Warn,
                        format!("Link {}:{} dead.", pe.name, links[l]),
                    );
                }
            }
            let dead = match (pe.liveness, pe.last_ms) {
                (Liveness::Alive, Some(t)) => now_ms.saturating_sub(t) > deadtime,
                (Liveness::Unknown, _) => now_ms.saturating_sub(boot) > self.p.initdead_ms,
                _ => false,
            };
            if dead {
                log(out, Level::Warn, format!("node {}: is dead", pe.name));
                let might_hold = pe.liveness == Liveness::Unknown || pe.state.holds_resources();
                pe.needs_fence = fence && might_hold;
                pe.fence_retry_ms = now_ms;
                if pe.state.holds_resources() {
                    log(
                        out,
                        Level::Info,
                        format!("Dead node {} held resources", pe.name),
                    );
                } else if pe.liveness == Liveness::Alive {
                    log(
                        out,
                        Level::Info,
                        format!("Dead node {} gave up resources.", pe.name),
                    );
                }
                pe.liveness = Liveness::Dead;
            }
        }
        if now_ms >= self.next_send_ms {
            self.next_send_ms = now_ms + self.p.keepalive_ms;
            if self.takeover_pending {
                let waiting = self
                    .peers
                    .iter()
                    .any(|p| p.liveness == Liveness::Alive && p.flags & FLAG_STANDBY == 0);
                if waiting && self.state != NodeState::Active {
                    self.send(now_ms, PacketType::TakeoverRequest, out);
                    return;
                }
                self.takeover_pending = false;
            }
            self.send(now_ms, PacketType::Heartbeat, out);
        }
    }

    fn on_packet(&mut self, now_ms: u64, link: usize, pk: Packet, out: &mut Vec<Action>) {
        if pk.sender == self.p.node {
            return;
        }
        if link >= self.p.links.len() {
            log(out, Level::Warn, format!("packet on unknown link {link}"));
            return;
        }
        let Some(i) = self.peers.iter().position(|p| p.name == pk.sender) else {
            log(
                out,
                Level::Warn,
                format!("packet from unknown node '{}' ignored", pk.sender),
            );
            return;
        };
        let warntime = self.p.warntime_ms;
        let link_name = self.p.links[link].clone();
        let pe = &mut self.peers[i];
        if let Some(last) = pe.last_ms {
            let interval = now_ms.saturating_sub(last);
            if pe.liveness == Liveness::Alive
                && interval > warntime
                && pk.generation == pe.generation.unwrap_or(0)
            {
                log(
                    out,
                    Level::Warn,
                    format!("Late heartbeat: Node {}: interval {interval} ms", pe.name),
                );
            }
        }
        if !pe.link_up[link] {
            pe.link_up[link] = true;
            log(
                out,
                Level::Info,
                format!("Link {}:{} up.", pe.name, link_name),
            );
        }
        pe.link_last_ms[link] = Some(now_ms);
        pe.last_ms = Some(now_ms);
        if pe.generation.is_some_and(|g| g != pk.generation) {
            log(
                out,
                Level::Info,
                format!("Heartbeat restart on node {}", pe.name),
            );
        }
        pe.generation = Some(pk.generation);
        if pe.liveness != Liveness::Alive && pk.kind != PacketType::Shutdown {
            log(
                out,
                Level::Info,
                format!(
                    "Status update for node {}: status {}",
                    pe.name,
                    pk.state.as_str()
                ),
            );
            pe.liveness = Liveness::Alive;
            pe.needs_fence = false;
        } else if pe.state != pk.state {
            log(
                out,
                Level::Info,
                format!(
                    "Status update for node {}: status {}",
                    pe.name,
                    pk.state.as_str()
                ),
            );
        }
        pe.state = pk.state;
        pe.flags = pk.flags;
        pe.owner = pk.owner.clone();
        // Both nodes hold the group (each declared the other dead while cut off): say
        // so loudly, once per episode; `want_hold` then makes the worse ranked release.
        if self.state.holds_resources() && pk.state.holds_resources() {
            if !pe.split_brain_logged {
                pe.split_brain_logged = true;
                log(
                    out,
                    Level::Error,
                    format!(
                        "split brain: node {} also holds the resource group (state {}, here {}); the better ranked node keeps it",
                        pe.name,
                        pk.state.as_str(),
                        self.state.as_str()
                    ),
                );
            }
        } else {
            pe.split_brain_logged = false;
        }
        if pk.state == NodeState::Active {
            self.last_owner = Some(pk.sender.clone());
        }
        match pk.kind {
            PacketType::Shutdown => {
                let pe = &mut self.peers[i];
                log(
                    out,
                    Level::Info,
                    format!("Received shutdown notice from '{}'.", pe.name),
                );
                pe.liveness = Liveness::Dead;
                pe.state = NodeState::Standby;
                pe.needs_fence = false;
                pe.link_up.iter_mut().for_each(|u| *u = false);
            }
            PacketType::TakeoverRequest => {
                if !self.standby {
                    log(
                        out,
                        Level::Info,
                        format!("Node {} requests takeover: going standby", pk.sender),
                    );
                    self.standby = true;
                }
                self.takeover_pending = false;
                self.send(now_ms, PacketType::TakeoverAck, out);
            }
            PacketType::TakeoverAck => {
                log(
                    out,
                    Level::Info,
                    format!("Node {} acknowledged takeover", pk.sender),
                );
            }
            PacketType::Heartbeat | PacketType::Standby | PacketType::ResourceState => {}
        }
    }

    fn on_fence(&mut self, now_ms: u64, node: &str, ok: bool, out: &mut Vec<Action>) {
        if self.fence_inflight.as_deref() != Some(node) {
            log(
                out,
                Level::Warn,
                format!("unexpected fence result for {node}"),
            );
            return;
        }
        self.fence_inflight = None;
        let retry = self.p.deadtime_ms;
        if let Some(pe) = self.peers.iter_mut().find(|p| p.name == node) {
            if ok {
                log(out, Level::Info, format!("node {node}: fenced"));
                pe.needs_fence = false;
                pe.state = NodeState::Standby;
            } else {
                log(out, Level::Error, format!("node {node}: fencing failed, retry in {retry} ms; resources not taken over"));
                pe.fence_retry_ms = now_ms + retry;
            }
        }
    }

    fn on_check(&mut self, index: usize, ok: bool, out: &mut Vec<Action>) {
        if self.state != NodeState::Active || index >= self.checks.len() {
            return;
        }
        let (name, fall, rise) = self.p.checks[index].clone();
        let c = &mut self.checks[index];
        if ok {
            c.fails = 0;
            c.oks = c.oks.saturating_add(1);
            if c.failed && c.oks >= rise {
                c.failed = false;
                log(
                    out,
                    Level::Info,
                    format!("health check {name}: passing again ({rise} successes)"),
                );
            }
        } else {
            c.oks = 0;
            c.fails = c.fails.saturating_add(1);
            if !c.failed && c.fails >= fall {
                c.failed = true;
                log(
                    out,
                    Level::Warn,
                    format!("health check {name}: failed {fall} times: handing the group over"),
                );
            }
        }
    }

    fn on_resource(&mut self, now_ms: u64, index: usize, op: Op, ok: bool, out: &mut Vec<Action>) {
        if self.pending != Some((index, op)) {
            log(
                out,
                Level::Warn,
                format!("unexpected result for resource {index} {op:?}"),
            );
            return;
        }
        self.pending = None;
        let name = self.p.resources[index].clone();
        match op {
            Op::Start if ok => {
                self.res[index] = ResState::Started;
                self.started = index + 1;
                if self.shutting_down || !self.want_hold() {
                    self.begin_stop(now_ms, self.started, out);
                } else if self.started == self.res.len() {
                    log(out, Level::Info, "local HA resource acquisition completed");
                    self.set_state(now_ms, NodeState::Active, out);
                } else {
                    self.issue(index + 1, Op::Start, out);
                }
            }
            Op::Start => {
                self.res[index] = ResState::Failed;
                log(
                    out,
                    Level::Error,
                    format!(
                        "Resource {name} failed to start: rolling back, letting another node try"
                    ),
                );
                self.start_failed = true;
                self.begin_stop(now_ms, index + 1, out);
            }
            Op::Stop => {
                if ok {
                    self.res[index] = ResState::Stopped;
                } else {
                    self.res[index] = ResState::Failed;
                    self.stop_had_failure = true;
                    log(out, Level::Error, format!("Resource {name} failed to stop"));
                }
                self.started = index;
                if index == 0 {
                    self.finish_stop(now_ms, out);
                } else {
                    self.issue(index - 1, Op::Stop, out);
                }
            }
        }
    }

    fn issue(&mut self, index: usize, op: Op, out: &mut Vec<Action>) {
        debug_assert!(self.pending.is_none());
        self.res[index] = match op {
            Op::Start => ResState::Starting,
            Op::Stop => ResState::Stopping,
        };
        self.pending = Some((index, op));
        out.push(Action::Resource { index, op });
    }

    fn begin_start(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let prev = self.last_owner.clone().filter(|o| *o != self.p.node);
        if let Some(prev) = prev {
            let dead = self
                .peers
                .iter()
                .any(|p| p.name == prev && p.liveness == Liveness::Dead);
            if dead {
                let first = self.p.resources.first().cloned().unwrap_or_default();
                log(
                    out,
                    Level::Info,
                    format!("Taking over resource group {first}"),
                );
            }
            log(
                out,
                Level::Info,
                format!("Resources being acquired from {prev}."),
            );
        }
        log(
            out,
            Level::Info,
            format!(
                "Acquiring resource group: {} {}",
                self.p.preferred,
                self.p.resources.join(" ")
            ),
        );
        if self.standby {
            // Standby asks to give the group away now; a node that takes it because
            // nobody else can (the others died) is its owner from now on.
            log(
                out,
                Level::Info,
                "Standby cleared: this node takes the group",
            );
            self.standby = false;
        }
        self.stop_had_failure = false;
        self.started = 0;
        if self.res.is_empty() {
            self.set_state(now_ms, NodeState::Active, out);
            return;
        }
        self.set_state(now_ms, NodeState::Starting, out);
        self.issue(0, Op::Start, out);
    }

    fn begin_stop(&mut self, now_ms: u64, count: usize, out: &mut Vec<Action>) {
        log(
            out,
            Level::Info,
            format!(
                "Releasing resource group: {} {}",
                self.p.preferred,
                self.p.resources.join(" ")
            ),
        );
        self.started = count;
        self.set_state(now_ms, NodeState::Stopping, out);
        if count == 0 {
            self.finish_stop(now_ms, out);
        } else if self.pending.is_none() {
            self.issue(count - 1, Op::Stop, out);
        }
    }

    fn finish_stop(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        for c in &mut self.checks {
            c.fails = 0;
            c.oks = 0;
        }
        if self.stop_had_failure {
            self.unclean = true;
            log(out, Level::Error, "A resource failed to stop: node is unclean, staying in 'stopping' so no other node starts the group (fix it, then 'rdb-ha standby' retries the release)");
            self.send(now_ms, PacketType::ResourceState, out);
            return;
        }
        log(out, Level::Info, "Resource group released");
        self.set_state(now_ms, NodeState::Standby, out);
    }

    /// True when this node, holding the group, should keep it.
    fn want_hold(&self) -> bool {
        // Cut off from the ping nodes: never hold the group, even when no other node
        // can take it (no node serving beats two nodes serving).
        if self.p.ping && self.ping_lost {
            return false;
        }
        let my_tier = Self::tier(self.flags());
        // Another active node (split brain healed): the better ranked keeps it.
        for pe in self.peers.iter().filter(|p| p.liveness == Liveness::Alive) {
            if matches!(pe.state, NodeState::Active | NodeState::Starting) {
                let theirs = self.rank(pe.index, Self::tier(pe.flags).unwrap_or(2));
                let mine = self.rank(self.me, my_tier.unwrap_or(2));
                if theirs < mine {
                    return false;
                }
            }
        }
        match self.candidate() {
            Some((best, best_tier)) if best != self.me => match my_tier {
                None => false,
                Some(t) if best_tier < t => false,
                Some(_) => !(self.p.auto_failback && self.p.nodes[best] == self.p.preferred),
            },
            _ => true,
        }
    }

    fn reconcile(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        if self.shutting_down {
            match self.state {
                NodeState::Active => self.begin_stop(now_ms, self.started, out),
                NodeState::Stopping if self.unclean && self.pending.is_none() => {
                    log(
                        out,
                        Level::Error,
                        "rdb-ha exits unclean: resources may still run here",
                    );
                    out.push(Action::Exit);
                    self.exited = true;
                }
                NodeState::Standby if self.pending.is_none() => {
                    self.send(now_ms, PacketType::Shutdown, out);
                    log(out, Level::Info, "rdb-ha shutdown complete");
                    out.push(Action::Exit);
                    self.exited = true;
                }
                _ => {}
            }
            return;
        }
        match self.state {
            NodeState::Active => {
                if !self.want_hold() {
                    self.begin_stop(now_ms, self.started, out);
                }
            }
            NodeState::Starting | NodeState::Stopping => {}
            NodeState::Standby => {
                if self.pending.is_some() {
                    return;
                }
                if self.peers.iter().any(|p| p.liveness == Liveness::Unknown) {
                    return;
                }
                if self.p.ping && !self.ping_known {
                    return;
                }
                if self.ping_regained_ms.is_some_and(|t| {
                    now_ms.saturating_sub(t) < self.p.deadtime_ms
                        && self.peers.iter().any(|p| p.liveness == Liveness::Dead)
                }) {
                    return;
                }
                // Admin takeover: a live peer that has not gone standby yet may be
                // starting the group (its start crossed our request): wait for its
                // answer, then for it to release.
                if self.takeover_pending
                    && self
                        .peers
                        .iter()
                        .any(|p| p.liveness == Liveness::Alive && p.flags & FLAG_STANDBY == 0)
                {
                    return;
                }
                // Just back from a cut-off (ping nodes regained): a live peer may be
                // starting the group on the strength of our old flags; let it hear our
                // new ones and announce its start first (both nodes regaining the ping
                // nodes at once would otherwise both start).
                if self.ping_regained_ms.is_some_and(|t| {
                    now_ms.saturating_sub(t) < 2 * self.p.keepalive_ms
                        && self.peers.iter().any(|p| p.liveness == Liveness::Alive)
                }) {
                    return;
                }
                if self
                    .peers
                    .iter()
                    .any(|p| p.liveness == Liveness::Alive && p.state.holds_resources())
                {
                    return;
                }
                if self.candidate().map(|c| c.0) != Some(self.me) {
                    return;
                }
                if let Some(pe) = self
                    .peers
                    .iter()
                    .find(|p| p.liveness == Liveness::Dead && p.needs_fence)
                {
                    if self.fence_inflight.is_none() && now_ms >= pe.fence_retry_ms {
                        let name = pe.name.clone();
                        log(
                            out,
                            Level::Info,
                            format!("Fencing node {name} before takeover"),
                        );
                        self.fence_inflight = Some(name.clone());
                        out.push(Action::Fence(name));
                    }
                    return;
                }
                self.begin_start(now_ms, out);
            }
        }
    }

    /// A snapshot for status output.
    pub fn status(&self, now_ms: u64) -> Status {
        let age = |t: Option<u64>| t.map(|t| now_ms.saturating_sub(t));
        Status {
            node: self.p.node.clone(),
            generation: format!("{:016x}", self.p.generation),
            state: self.state.as_str(),
            owner: self.owner(),
            preferred: self.p.preferred.clone(),
            standby: self.standby,
            failed: self.start_failed || self.check_failed(),
            ping_lost: self.p.ping && self.ping_lost,
            unclean: self.unclean,
            peers: self
                .peers
                .iter()
                .map(|pe| PeerStatus {
                    name: pe.name.clone(),
                    liveness: pe.liveness,
                    state: pe.state.as_str(),
                    standby: pe.flags & FLAG_STANDBY != 0,
                    failed: pe.flags & FLAG_FAILED != 0,
                    ping_lost: pe.flags & FLAG_PING_LOST != 0,
                    last_heartbeat_age_ms: age(pe.last_ms),
                    links: self
                        .p
                        .links
                        .iter()
                        .enumerate()
                        .map(|(l, name)| LinkStatus {
                            name: name.clone(),
                            up: pe.link_up[l],
                            last_heartbeat_age_ms: age(pe.link_last_ms[l]),
                        })
                        .collect(),
                    needs_fence: pe.needs_fence,
                })
                .collect(),
            resources: self
                .p
                .resources
                .iter()
                .zip(&self.res)
                .map(|(n, s)| ResourceStatus {
                    name: n.clone(),
                    state: *s,
                })
                .collect(),
            checks: self
                .p
                .checks
                .iter()
                .zip(&self.checks)
                .map(|((n, _, _), c)| (n.clone(), c.failed))
                .collect(),
        }
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
