use super::*;

/// What the pre-copy loop did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Starting(MigrationPhase, u32, u64),
    /// Pages sent (`None`: all RAM), paced or not.
    Send(Option<Vec<u64>>, bool),
    Harvest,
    RoundDone(u32, u64, u64),
    Quiesce,
    FinalState,
}

/// A guest whose harvests return scripted page sets (the last one again when the
/// script runs out), recording every call; `fail` names a call that fails.
struct Fake {
    harvests: Vec<Vec<u64>>,
    next: usize,
    events: Vec<Ev>,
    fail: Option<&'static str>,
}

const RAM: [(u64, u64); 2] = [(0, 32 * 4096), (1 << 32, 32 * 4096)];

impl Fake {
    fn new(harvests: Vec<Vec<u64>>) -> Fake {
        Fake {
            harvests,
            next: 0,
            events: Vec::new(),
            fail: None,
        }
    }

    fn failing(&self, what: &'static str) -> Result<(), MigrationError> {
        if self.fail == Some(what) {
            return Err(MigrationError::State(format!("{what} failed")));
        }
        Ok(())
    }
}

impl Source for Fake {
    fn send(&mut self, dirty: Option<&DirtyBitmap>, paced: bool) -> Result<u64, MigrationError> {
        let pages = dirty.map(|d| {
            let mut v = Vec::new();
            d.for_each_run(|gpa, len| v.extend(gpa / 4096..(gpa + len) / 4096));
            v
        });
        let n = pages.as_ref().map_or(64, |p| p.len() as u64);
        self.events.push(Ev::Send(pages, paced));
        Ok(n)
    }

    fn harvest(&mut self, out: &mut DirtyBitmap) -> Result<DirtySources, MigrationError> {
        self.events.push(Ev::Harvest);
        let last = self.next == self.harvests.len() - 1;
        if last || self.next >= self.harvests.len() {
            self.failing("last harvest")?;
        }
        let pages = &self.harvests[self.next.min(self.harvests.len() - 1)];
        self.next += 1;
        for &p in pages {
            out.mark(p, 1);
        }
        Ok(DirtySources {
            kvm: pages.len() as u64,
            ..Default::default()
        })
    }

    fn starting(&mut self, phase: MigrationPhase, round: u32, pages: u64) {
        self.events.push(Ev::Starting(phase, round, pages));
    }

    fn round_done(&mut self, r: &Round) {
        self.events
            .push(Ev::RoundDone(r.round, r.pages, r.dirty_after));
    }

    fn quiesce(&mut self) -> Result<(), MigrationError> {
        self.events.push(Ev::Quiesce);
        self.failing("quiesce")
    }

    fn send_final_state(&mut self) -> Result<(), MigrationError> {
        self.events.push(Ev::FinalState);
        Ok(())
    }
}

fn opts(max_rounds: u32, max_dirty_pages: u64) -> MigrateOptions {
    MigrateOptions {
        max_rounds,
        max_dirty_pages,
        ..Default::default()
    }
}

const HIGH: u64 = (1 << 32) / 4096;

/// Each round sends exactly what the harvest before it found (the set, in both RAM
/// regions), paced; the rounds end once few pages are dirty; the stop-and-copy pauses
/// the guest before its last harvest and sends, unpaced, what that harvest and the
/// round before it left, then the state.
#[test]
fn rounds_send_what_the_last_harvest_found_and_the_stop_and_copy_comes_last() {
    use MigrationPhase::{Copy, StopAndCopy};
    let mut f = Fake::new(vec![
        (0..10).chain([HIGH + 1, HIGH + 31]).collect(),
        vec![3, 4, HIGH + 5],
        vec![7],
        vec![9, HIGH],
    ]);
    let mut report = MigrationReport::default();
    precopy(&mut f, &RAM, &opts(30, 2), &mut report).unwrap();
    let mut first: Vec<u64> = (0..10).collect();
    first.extend([HIGH + 1, HIGH + 31]);
    assert_eq!(
        f.events,
        vec![
            Ev::Starting(Copy, 0, 0),
            Ev::Send(None, true),
            Ev::Harvest,
            Ev::RoundDone(0, 64, 12),
            Ev::Starting(Copy, 1, 12),
            Ev::Send(Some(first), true),
            Ev::Harvest,
            Ev::RoundDone(1, 12, 3),
            Ev::Starting(Copy, 2, 3),
            Ev::Send(Some(vec![3, 4, HIGH + 5]), true),
            Ev::Harvest,
            Ev::RoundDone(2, 3, 1),
            Ev::Starting(StopAndCopy, 3, 1),
            Ev::Quiesce,
            Ev::Harvest,
            Ev::Send(Some(vec![7, 9, HIGH]), false),
            Ev::FinalState,
        ]
    );
    assert_eq!(report.rounds.len(), 3);
    assert_eq!(report.final_pages, 3);
    assert_eq!(report.pages, 64 + 12 + 3 + 3);
    assert_eq!(report.dirty_by_source.kvm, 12 + 3 + 1 + 2);
    assert_eq!(report.final_by_source.kvm, 2);
}

/// A guest that keeps dirtying more than the limit gets `max_rounds` rounds after the
/// full copy, then the stop-and-copy; with `max_rounds` 0 the full copy is the only
/// round.
#[test]
fn max_rounds_bounds_the_rounds_whatever_stays_dirty() {
    for max_rounds in [0u32, 1, 3] {
        let mut f = Fake::new(vec![(0..20).collect()]);
        let mut report = MigrationReport::default();
        precopy(&mut f, &RAM, &opts(max_rounds, 2), &mut report).unwrap();
        let rounds: Vec<u32> = report.rounds.iter().map(|r| r.round).collect();
        assert_eq!(rounds, (0..=max_rounds).collect::<Vec<_>>());
        let tail = &f.events[f.events.len() - 4..];
        assert_eq!(tail[0], Ev::Quiesce);
        assert_eq!(tail[3], Ev::FinalState);
        assert_eq!(report.final_pages, 20);
    }
    // At the limit exactly: no round after the full copy.
    let mut f = Fake::new(vec![(0..2).collect()]);
    let mut report = MigrationReport::default();
    precopy(&mut f, &RAM, &opts(30, 2), &mut report).unwrap();
    assert_eq!(report.rounds.len(), 1);
}

/// A failure says whether the guest was paused by then: not when the pause itself
/// failed, yes when the last harvest failed (and nothing more is sent).
#[test]
fn a_failure_says_whether_the_guest_was_paused() {
    let mut f = Fake::new(vec![vec![1], vec![2]]);
    f.fail = Some("quiesce");
    let (e, paused) =
        precopy(&mut f, &RAM, &opts(30, 2), &mut Default::default()).expect_err("the pause failed");
    assert!(!paused && e.to_string().contains("quiesce failed"), "{e}");
    assert_eq!(f.events.last(), Some(&Ev::Quiesce));

    let mut f = Fake::new(vec![vec![1], vec![2]]);
    f.fail = Some("last harvest");
    let (e, paused) = precopy(&mut f, &RAM, &opts(30, 2), &mut Default::default())
        .expect_err("the last harvest failed");
    assert!(
        paused && e.to_string().contains("last harvest failed"),
        "{e}"
    );
    let after: Vec<&Ev> = f.events.iter().skip_while(|e| **e != Ev::Quiesce).collect();
    assert_eq!(after, vec![&Ev::Quiesce, &Ev::Harvest]);
}

#[test]
fn the_pace_holds_a_sender_to_its_bytes_per_second() {
    let s = Duration::from_secs;
    // No limit: never ahead.
    assert_eq!(ahead_by(1 << 30, 0, s(0)), None);
    // 64 MiB at 32 MiB/s are due after 2 s.
    assert_eq!(ahead_by(64 << 20, 32 << 20, s(0)), Some(s(2)));
    assert_eq!(
        ahead_by(64 << 20, 32 << 20, Duration::from_millis(500)),
        Some(Duration::from_millis(1500))
    );
    // On time or late: no wait.
    assert_eq!(ahead_by(64 << 20, 32 << 20, s(2)), None);
    assert_eq!(ahead_by(64 << 20, 32 << 20, s(3)), None);
}

/// `Pace::sent` holds the sender back: 1 MiB counted at 8 MiB/s returns no sooner than
/// 125 ms after the pace started (a sleep never ends early, so the bound is exact, not a
/// guess at this machine's speed). Without a limit it counts and returns.
#[test]
fn the_pace_sleeps_while_the_sender_is_ahead() {
    let mut pace = Pace::new(8 << 20);
    pace.sent(1 << 20);
    assert!(pace.start.elapsed() >= Duration::from_millis(125));
    assert_eq!(pace.bytes, 1 << 20);
    let mut free = Pace::new(0);
    free.sent(1 << 30);
    assert_eq!(free.bytes, 1 << 30);
}

#[test]
fn max_bandwidth_is_a_migrate_argument_and_defaults_to_no_limit() {
    let o: MigrateOptions =
        serde_json::from_str(r#"{"to":"unix:/x","max_bandwidth":1048576}"#).unwrap();
    assert_eq!(o.max_bandwidth, 1 << 20);
    assert_eq!(MigrateOptions::default().max_bandwidth, 0);
}

/// The status's estimates from a round: 50 pages dirty after 200 ms are 250 pages/s; at
/// 0.2 ms per page sent, their stop-and-copy takes 10 ms, plus 5 for the state. A round
/// under a millisecond reports its count; one that sent nothing estimates the state alone.
#[test]
fn a_round_gives_the_dirty_rate_and_the_downtime_estimate() {
    let r = |pages, ms, dirty_after| Round {
        round: 1,
        pages,
        ms,
        dirty_after,
        harvest_ms: 0.0,
        dirty_by_source: DirtySources::default(),
    };
    assert_eq!(r(1000, 200, 50).dirty_rate(), 250);
    assert_eq!(r(1000, 200, 50).expected_downtime_ms(), 15.0);
    assert_eq!(r(1000, 0, 50).dirty_rate(), 50);
    assert_eq!(r(0, 200, 50).expected_downtime_ms(), 5.0);
    assert_eq!(r(4000, 100, 3).dirty_rate(), 30);
    assert_eq!(r(4000, 100, 400).expected_downtime_ms(), 15.0);
}

/// A migration between two machines of this process (real KVM VMs, no kernel), over a Unix
/// socket, while the source's vCPU counts in memory.
mod between_machines {
    use std::path::PathBuf;
    use std::sync::Arc;

    use crate::machine::tests::{
        counter, machine, start_counting, stop_vcpus, wait_for, COUNTING_CODE,
    };
    use crate::migration::{receive, HandoverResolver};

    use super::*;

    /// Nobody to decide a hand-over left unconfirmed (as a destination without an API).
    struct NoUser;

    impl HandoverResolver for NoUser {
        fn wait(&self, _why: &str) -> Option<bool> {
            None
        }
    }

    /// Writes `len` bytes of data into guest RAM from 16 MiB on (pages a copy must send).
    fn fill_with_data(m: &Machine, len: usize) {
        use vm_memory::Bytes;
        m.ram
            .mem
            .write_slice(&vec![0x5a; len], vm_memory::GuestAddress(16 << 20))
            .unwrap();
    }

    /// A socket path of this test's own.
    fn socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-send-{name}-{}.sock", std::process::id()))
    }

    /// The receiving thread: its outcome, and the destination's vCPUs.
    type Receiver = std::thread::JoinHandle<(Result<(), MigrationError>, Vec<kvm_ioctls::VcpuFd>)>;

    /// A destination of `memory` receiving on `sock` on a thread: its machine, and the
    /// thread's outcome with the destination's vCPUs.
    fn destination(memory: &str, sock: &std::path::Path) -> (Arc<Machine>, Receiver) {
        let (d, vcpus) = machine(memory);
        let addr: Address = format!("unix:{}", sock.display()).parse().unwrap();
        let m = d.clone();
        let t = std::thread::spawn(move || {
            let r = receive(&m, &vcpus, &crate::migration::Source::Listen(addr), &NoUser);
            (r, vcpus)
        });
        wait_for("the destination listening", || sock.exists());
        (d, t)
    }

    /// The destination gets every page (verify compares them all) and the vCPU where the
    /// source paused it; the source stays paused, its tracking off.
    #[test]
    fn a_counting_guest_arrives_whole_and_stays_paused_here() {
        let sock = socket("whole");
        let (src, vcpus) = machine("64M");
        // 4 MiB and two pages of data (two RAM records), sent at 8 MiB/s: the first copy
        // takes half a second, during which the guest counts on, so that only later rounds
        // and the stop-and-copy carry the count the destination must end with.
        fill_with_data(&src, (4 << 20) + 0x2000);
        start_counting(&src, vcpus);
        wait_for("the guest counting", || counter(&src) > 0);
        let (dst, receiver) = destination("64M", &sock);
        let report = migrate(
            &src,
            &MigrateOptions {
                to: format!("unix:{}", sock.display()),
                verify: true,
                max_bandwidth: 8 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        let (received, dst_vcpus) = receiver.join().unwrap();
        received.unwrap();
        // Paused here: the count stands still.
        let here = counter(&src);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(counter(&src), here, "the source ran on after the hand-over");
        assert_eq!(counter(&dst), here, "the destination's count");
        assert_eq!(
            crate::migration::ram_hashes(&dst).unwrap(),
            crate::migration::ram_hashes(&src).unwrap()
        );
        let rip = dst_vcpus[0].get_regs().unwrap().rip;
        assert!(
            COUNTING_CODE.contains(&rip),
            "the destination's rip {rip:#x}"
        );
        assert_eq!(report.verified_pages, (64 << 20) / 4096);
        assert!(
            !report.rounds.is_empty() && report.rounds[0].pages > 0,
            "the first copy"
        );
        assert_eq!(
            report.pages,
            report.rounds.iter().map(|r| r.pages).sum::<u64>() + report.final_pages
        );
        assert!(report.bytes > report.pages * 4096);
        assert!(report.untracked_devices.is_empty());
        assert!(src.progress.status().is_none(), "no migration under way");
        stop_vcpus(&src);
    }

    /// A destination of another shape refuses, and says why; the guest runs on here.
    #[test]
    fn a_refusing_destination_names_why_and_the_guest_runs_on_here() {
        let sock = socket("refused");
        let (src, vcpus) = machine("64M");
        // More data than the socket holds: the destination hangs up while the source still
        // writes, and the source reads its reason from the ACK it left.
        fill_with_data(&src, 8 << 20);
        start_counting(&src, vcpus);
        wait_for("the guest counting", || counter(&src) > 0);
        let (_dst, receiver) = destination("128M", &sock);
        let e = migrate(
            &src,
            &MigrateOptions {
                to: format!("unix:{}", sock.display()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, MigrationError::Refused(_)), "{e}");
        assert!(e.to_string().contains("memory"), "{e}");
        assert!(receiver.join().unwrap().0.is_err());
        let now = counter(&src);
        wait_for("the guest counting on", || counter(&src) > now);
        assert_eq!(*src.lifecycle.locked(), Lifecycle::Running);
        assert!(src.progress.status().is_none());
        stop_vcpus(&src);
    }

    /// Nothing listens: the error names the address, and the guest was never stopped. More
    /// rounds than a destination accepts are refused before connecting.
    #[test]
    fn no_destination_is_named_and_the_guest_never_stops() {
        let (src, vcpus) = machine("64M");
        start_counting(&src, vcpus);
        let to = format!("unix:{}", socket("nobody").display());
        // As many rounds as a destination accepts: the connection is what fails.
        let e = migrate(
            &src,
            &MigrateOptions {
                to: to.clone(),
                max_rounds: MAX_ROUNDS,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains(&to), "{e}");
        // One more: refused before connecting, by name.
        let e = migrate(
            &src,
            &MigrateOptions {
                to: to.clone(),
                max_rounds: MAX_ROUNDS + 1,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(&e, MigrationError::Busy(m) if m.contains("max_rounds")),
            "{e}"
        );
        let now = counter(&src);
        wait_for("the guest counting on", || counter(&src) > now);
        stop_vcpus(&src);
    }

    /// A snapshot of a running guest leaves it running; of a paused one, paused (and then
    /// exact: the restored guest has the count, every page and the vCPU where it stopped).
    /// The file is the user's alone, and a restore with verify compares every page.
    #[test]
    fn a_snapshot_restores_whole_and_leaves_the_guest_as_it_was() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vmm-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (src, vcpus) = machine("64M");
        start_counting(&src, vcpus);
        wait_for("the guest counting", || counter(&src) > 0);
        let report = snapshot(&src, &dir, false).unwrap();
        assert!(report.pages > 0 && report.bytes > report.pages * 4096);
        let now = counter(&src);
        wait_for("the guest counting on", || counter(&src) > now);
        // Paused, as the API's pause leaves it.
        src.pause_vcpus().unwrap();
        *src.lifecycle.locked() = Lifecycle::Paused;
        let paused = counter(&src);
        snapshot(&src, &dir, true).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            counter(&src),
            paused,
            "a paused guest ran after its snapshot"
        );
        let file = dir.join("snapshot.vmm");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.join("snapshot.vmm.partial").exists());
        let (dst, dst_vcpus) = machine("64M");
        receive(
            &dst,
            &dst_vcpus,
            &crate::migration::Source::Snapshot(dir.clone()),
            &NoUser,
        )
        .unwrap();
        assert_eq!(counter(&dst), paused);
        assert_eq!(
            crate::migration::ram_hashes(&dst).unwrap(),
            crate::migration::ram_hashes(&src).unwrap()
        );
        let rip = dst_vcpus[0].get_regs().unwrap().rip;
        assert!(COUNTING_CODE.contains(&rip), "the restored rip {rip:#x}");
        stop_vcpus(&src);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// How the scripted destination answers once it has read the stream to its END.
    enum Answer {
        /// ACK `{"ok": false, "error": ...}`.
        Refuse(&'static str),
        /// DONE where the ACK belongs.
        NotAnAck,
        /// ACK, then the source's own RAM hashes with the one of page `n` changed.
        HashesDifferingAt(usize),
        /// ACK, then, once the COMMIT came, a hang-up instead of DONE.
        NoDone,
    }

    /// A destination that reads the stream as a real one does (into no RAM) and answers as
    /// `answer` says; returns the records it read after its answer.
    fn scripted_destination(
        sock: &std::path::Path,
        src: &Arc<Machine>,
        answer: Answer,
    ) -> std::thread::JoinHandle<Vec<Kind>> {
        let _ = std::fs::remove_file(sock);
        let l = std::os::unix::net::UnixListener::bind(sock).unwrap();
        let src = src.clone();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let config = src.current_config();
            crate::migration::read_stream(&s, &config, &src.devices.ram_ranges, |_, _| Ok(()))
                .unwrap();
            let mut back = StreamWriter::new(&s).unwrap();
            let ok = serde_json::json!({"ok": true});
            match answer {
                Answer::Refuse(why) => back
                    .json(Kind::Ack, &serde_json::json!({"ok": false, "error": why}))
                    .unwrap(),
                Answer::NotAnAck => back.record(Kind::Done, &[]).unwrap(),
                Answer::HashesDifferingAt(n) => {
                    // The source is paused: its RAM stands still.
                    let mut h = crate::migration::ram_hashes(&src).unwrap();
                    h[n] ^= 1;
                    back.json(Kind::Ack, &ok).unwrap();
                    back.hashes(&h).unwrap();
                }
                Answer::NoDone => back.json(Kind::Ack, &ok).unwrap(),
            }
            back.flush().unwrap();
            let mut r = StreamReader::resume(&s, 0);
            let mut after = Vec::new();
            while let Ok((k, _)) = r.next_record() {
                after.push(k);
                if matches!(answer, Answer::NoDone) {
                    break;
                }
            }
            after
        })
    }

    /// Migrates a counting guest to a destination answering `answer`; returns the error
    /// and the records the destination read after answering.
    fn migrate_to_scripted(
        name: &str,
        answer: Answer,
        verify: bool,
    ) -> (Arc<Machine>, MigrationError, Vec<Kind>) {
        let sock = socket(name);
        let (src, vcpus) = machine("64M");
        start_counting(&src, vcpus);
        wait_for("the guest counting", || counter(&src) > 0);
        let dst = scripted_destination(&sock, &src, answer);
        let e = migrate(
            &src,
            &MigrateOptions {
                to: format!("unix:{}", sock.display()),
                verify,
                timeout_ms: 2_000,
                ..Default::default()
            },
        )
        .unwrap_err();
        (src, e, dst.join().unwrap())
    }

    /// Refusals before the COMMIT: the destination's reason (or what it sent instead of an
    /// ACK) is the error, the source tells it ABORT, and the guest runs on here.
    #[test]
    fn a_refusal_before_the_commit_aborts_and_the_guest_runs_on_here() {
        for (answer, why) in [
            (Answer::Refuse("no room"), "no room".to_string()),
            (Answer::NotAnAck, "unexpected Done record".to_string()),
        ] {
            let (src, e, after) = migrate_to_scripted("refusal", answer, false);
            assert!(matches!(&e, MigrationError::Refused(r) if *r == why), "{e}");
            assert_eq!(after, [Kind::Abort]);
            let now = counter(&src);
            wait_for("the guest counting on", || counter(&src) > now);
            assert_eq!(*src.lifecycle.locked(), Lifecycle::Running);
            stop_vcpus(&src);
        }
    }

    /// Verify compares every page's hash: one page differing fails the migration naming its
    /// GPA, before any COMMIT, and the guest runs on here.
    #[test]
    fn one_page_differing_fails_verify_by_its_gpa() {
        // Page 0x1234 of the 64 MiB (below the PCI hole: GPA = index * 4 KiB).
        let (src, e, after) =
            migrate_to_scripted("verify", Answer::HashesDifferingAt(0x1234), true);
        assert_eq!(
            e.to_string(),
            MigrationError::Verify(
                "1 pages differ between source and destination: 0x1234000".into()
            )
            .to_string()
        );
        assert_eq!(after, [Kind::Abort]);
        let now = counter(&src);
        wait_for("the guest counting on", || counter(&src) > now);
        stop_vcpus(&src);
    }

    /// After the COMMIT the guest may run there: without the destination's DONE it stays
    /// stopped here for good (`HandoverUnconfirmed`) until the user resumes it.
    #[test]
    fn no_done_after_the_commit_leaves_the_guest_stopped_here() {
        let (src, e, after) = migrate_to_scripted("no-done", Answer::NoDone, false);
        assert!(matches!(e, MigrationError::Unconfirmed(_)), "{e}");
        assert_eq!(after, [Kind::Commit]);
        assert_eq!(*src.lifecycle.locked(), Lifecycle::HandoverUnconfirmed);
        let stopped = counter(&src);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(counter(&src), stopped, "the guest ran on here");
        resume_after_handover(&src);
        wait_for("the guest counting again", || counter(&src) > stopped);
        stop_vcpus(&src);
    }
}
