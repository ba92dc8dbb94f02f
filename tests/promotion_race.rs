//! Racing promotions on two connected nodes (real rdbd processes): `rdbadm primary`
//! started on both nodes at once, many rounds; each round ends with exactly one
//! Primary (the cluster-wide state change of `src/engine/core.rs`), the loser shows
//! DRBD's error text, and the nodes stay connected.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const ROUNDS: usize = 50;

fn roles(c: &Cluster, node: &str) -> (String, String, String) {
    let s = c.status(node);
    (
        s["role"].as_str().unwrap_or("?").to_string(),
        s["peer_role"].as_str().unwrap_or("?").to_string(),
        s["connection"].as_str().unwrap_or("?").to_string(),
    )
}

fn both_secondary_connected(c: &Cluster) -> bool {
    ["alpha", "beta"].iter().all(|n| {
        let (role, peer, conn) = roles(c, n);
        role == "Secondary" && peer == "Secondary" && conn == "Connected"
    })
}

fn primary_cmd(c: &Cluster, node: &str) -> Command {
    let run_dir = c.run_dir(node);
    let mut cmd = Command::new(bin("rdbadm"));
    cmd.args(["-c", &c.conf.display().to_string(), "--node", node])
        .args(["--run-dir", &run_dir.display().to_string(), "primary", "r0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn racing_primary_commands_give_at_most_one_primary() {
    let c = Cluster::with_sections("race", "C", "16M", "", "frontend none;");
    for n in ["alpha", "beta"] {
        c.adm_ok(n, &["create-md", "r0"]);
        c.adm_ok(n, &["up", "r0"]);
    }
    c.adm_ok("alpha", &["primary", "r0", "--force"]);
    assert!(
        wait_for(Duration::from_secs(60), || {
            let s = c.status("alpha");
            s["connection"] == "Connected" && s["peer_disk"] == "UpToDate"
        }),
        "initial sync never finished: {}\n{}",
        c.status("alpha"),
        c.log_tail("alpha")
    );
    c.adm_ok("alpha", &["secondary", "r0"]);
    let mut wins = [0usize; 2];
    let mut refusals = Vec::new();
    for round in 0..ROUNDS {
        assert!(
            wait_for(Duration::from_secs(20), || both_secondary_connected(&c)),
            "round {round}: not back to two connected Secondaries: {:?} {:?}",
            roles(&c, "alpha"),
            roles(&c, "beta")
        );
        // Alternate which command starts first; both start within microseconds.
        let order = if round % 2 == 0 {
            ["alpha", "beta"]
        } else {
            ["beta", "alpha"]
        };
        let children: Vec<_> = order
            .iter()
            .map(|n| primary_cmd(&c, n).spawn().expect("spawn rdbadm primary"))
            .collect();
        let outs: Vec<_> = children
            .into_iter()
            .map(|ch| ch.wait_with_output().expect("wait for rdbadm"))
            .collect();
        let ok: Vec<&str> = order
            .iter()
            .zip(&outs)
            .filter(|(_, o)| o.status.success())
            .map(|(n, _)| *n)
            .collect();
        let (ra, pa, ca) = roles(&c, "alpha");
        let (rb, pb, cb) = roles(&c, "beta");
        let primaries = [&ra, &rb]
            .iter()
            .filter(|r| r.as_str() == "Primary")
            .count();
        assert!(
            primaries <= 1 && ok.len() <= 1,
            "round {round}: two Primaries: succeeded {ok:?}; alpha {ra}/{pa}/{ca}, beta {rb}/{pb}/{cb}\nalpha:\n{}\nbeta:\n{}",
            c.log_tail("alpha"),
            c.log_tail("beta")
        );
        assert_eq!(
            ok.len(),
            1,
            "round {round}: nobody won: {:?}",
            outs.iter()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .collect::<Vec<_>>()
        );
        assert_eq!(primaries, 1, "round {round}: the winner is not Primary");
        for (n, o) in order.iter().zip(&outs) {
            if !o.status.success() {
                let err = String::from_utf8_lossy(&o.stderr).into_owned()
                    + &String::from_utf8_lossy(&o.stdout);
                assert!(
                    err.contains(
                        "State change failed: (-1) Multiple primaries not allowed by config"
                    ) || err.contains(
                        "State change failed: (-19) Concurrent state changes detected and aborted"
                    ),
                    "round {round}: {n}'s refusal does not use DRBD's words: {err}"
                );
                refusals.push(err);
            }
        }
        assert_eq!((ca.as_str(), cb.as_str()), ("Connected", "Connected"));
        let winner = ok[0];
        wins[usize::from(winner == "beta")] += 1;
        c.adm_ok(winner, &["secondary", "r0"]);
    }
    eprintln!(
        "{ROUNDS} rounds: alpha won {}, beta won {}; refusals seen: {}",
        wins[0],
        wins[1],
        refusals
            .iter()
            .map(|r| r.trim().lines().last().unwrap_or("").to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(" | ")
    );
}
