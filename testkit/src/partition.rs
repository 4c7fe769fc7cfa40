//! A network partition on this machine: every packet to and from one server
//! address (`127.0.0.2:PORT`) is dropped by the kernel, as when a cable or a
//! route breaks. Nothing is closed: no FIN, no RST, keepalive probes go
//! unanswered, and a peer finds out only through its own timeouts. (A relay
//! in userspace that stops forwarding is no partition: its kernel still
//! acknowledges, so keepalives succeed.)
//!
//! How: a `clsact` qdisc on `lo` and two `u32` filters on its ingress (every
//! loopback packet passes it once), one per direction, matching the server's
//! address and port exactly, with a `mirred` redirect to a veth that is down:
//! the kernel drops what it cannot send there. The small VM kernels CI runs on
//! build in neither the `gact` (drop) action nor `netem` or `prio`, but they
//! have `clsact`, `u32`, `mirred` and veth. Needs root (CI runs as root).
//!
//! Ingress, not egress: a packet dropped on its way out is reported to the
//! sending socket as local congestion, and TCP then retries a keepalive probe
//! every half second without ever counting it as unanswered, so the peer is
//! never found dead. Dropped on the way in, the probe has left as far as the
//! sender knows, as on a real network.
//!
//! The server listens on `127.0.0.2` as well as `127.0.0.1`, so that one
//! client (one replica) is cut off by connecting through `127.0.0.2` while
//! the others keep their path. The rules name that address and the test's own
//! port, so they never touch another test's traffic, and they are removed
//! when the [`Partition`] is dropped, a failing test's unwinding included.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

/// Partitions alive in this process: the first adds the `clsact` qdisc, the
/// last removes it (when it was not there before).
static ALIVE: Mutex<Cuts> = Mutex::new(Cuts {
    count: 0,
    made_qdisc: false,
});

struct Cuts {
    count: usize,
    made_qdisc: bool,
}

/// Packets to and from `addr:port` are dropped while this lives.
pub struct Partition {
    addr: Ipv4Addr,
    port: u16,
    /// The down veth that swallows them (named after the port).
    device: String,
}

impl Partition {
    /// Cuts `addr:port` off (both directions, established connections and
    /// new ones). `addr` must not be `127.0.0.1`, which every test shares.
    /// Panics, saying why, when the kernel or `tc` refuses.
    pub fn cut(addr: Ipv4Addr, port: u16) -> Partition {
        assert!(
            addr.is_loopback() && addr != Ipv4Addr::LOCALHOST,
            "cut a loopback address of the test's own, not {addr}"
        );
        let device = format!("xo2cut{port}");
        // Left over by a test process that was killed: start clean.
        let _ = Command::new("ip").args(["link", "del", &device]).output();
        run(&[
            "ip",
            "link",
            "add",
            &device,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{device}p"),
        ]);
        let partition = Partition { addr, port, device };
        {
            let mut cuts = ALIVE.lock().unwrap_or_else(|e| e.into_inner());
            if cuts.count == 0 && !has_clsact() {
                run(&["tc", "qdisc", "add", "dev", "lo", "clsact"]);
                cuts.made_qdisc = true;
            }
            cuts.count += 1;
        }
        let (host, port, pref) = (
            format!("{addr}/32"),
            port.to_string(),
            partition.pref().to_string(),
        );
        for (address, side) in [("dst", "dport"), ("src", "sport")] {
            run(&[
                "tc",
                "filter",
                "add",
                "dev",
                "lo",
                "ingress",
                "protocol",
                "ip",
                "pref",
                &pref,
                "u32",
                "match",
                "ip",
                address,
                &host,
                "match",
                "ip",
                side,
                &port,
                "0xffff",
                "action",
                "mirred",
                "egress",
                "redirect",
                "dev",
                &partition.device,
            ]);
        }
        partition
    }

    /// The filters' preference, unique to this port (ports in use by
    /// tests are never 0).
    fn pref(&self) -> u16 {
        self.port
    }

    /// Packets dropped so far (both directions), from the filters' counters.
    pub fn dropped(&self) -> u64 {
        let out = Command::new("tc")
            .args(["-s", "filter", "show", "dev", "lo", "ingress", "pref"])
            .arg(self.pref().to_string())
            .output()
            .expect("tc runs");
        // "Sent 370 bytes 5 pkt (dropped 0, overlimits 5 requeues 0)": the
        // redirect to a down device counts each packet as an overlimit.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split("overlimits ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let pref = self.pref().to_string();
        let steps: [&[&str]; 2] = [
            &["tc", "filter", "del", "dev", "lo", "ingress", "pref", &pref],
            &["ip", "link", "del", &self.device],
        ];
        for step in steps {
            if let Err(e) = try_run(step) {
                eprintln!(
                    "could not undo the partition of {}:{}: {e}",
                    self.addr, self.port
                );
            }
        }
        let mut cuts = ALIVE.lock().unwrap_or_else(|e| e.into_inner());
        cuts.count -= 1;
        if cuts.count == 0 && cuts.made_qdisc {
            cuts.made_qdisc = false;
            if let Err(e) = try_run(&["tc", "qdisc", "del", "dev", "lo", "clsact"]) {
                eprintln!("could not remove the clsact qdisc of lo: {e}");
            }
        }
    }
}

fn has_clsact() -> bool {
    Command::new("tc")
        .args(["qdisc", "show", "dev", "lo"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("clsact"))
}

fn run(args: &[&str]) {
    if let Err(e) = try_run(args) {
        panic!("cannot cut the network (root, tc and ip from iproute2 are needed): {e}");
    }
}

fn try_run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
