//! Live migration and snapshots with a passthrough device behind the vIOMMU, as real
//! processes: two VMMs and two DMA test device processes. The fast test guest's
//! `migrate_dma` case keeps the device writing a known value into guest memory by DMA through
//! mappings that change every iteration (map, fill, unmap), checks before every refill that
//! the previous fill is still there, and checks every page at the end.

use std::path::Path;
use std::time::Duration;

use vmm_tests::migration::{
    self, assert_handed_over, assert_migrated, assert_never_ran, assert_verify_failed,
    wait_for_path,
};
use vmm_tests::{api, counter, run_as_nobody, scratch, DeviceProcess, VmmCommand, VmmProcess};

const DEADLINE: Duration = Duration::from_secs(300);
const MEMORY: &str = "256M";

/// The guest keeps DMA-ing until it finds itself on another device process (migrated or
/// restored), then does 40 more iterations there: enough to revisit every window of its
/// area, whatever the time the migration takes.
const UNTIL_MIGRATED: &str = "until_migrated=1 iters=40";

/// Starts a source VM running `migrate_dma` (with `params`) with an API socket.
fn source(dev: &DeviceProcess, api_socket: &Path, params: &str) -> VmmProcess {
    source_env(dev, api_socket, params, &[], "")
}

/// [`source`] with environment variables (the hand-over fault hook) and more `--vfio-user`
/// options (`policy`, e.g. `,dma=fault`).
fn source_env(
    dev: &DeviceProcess,
    api_socket: &Path,
    params: &str,
    env: &[(&str, &str)],
    policy: &str,
) -> VmmProcess {
    // The device first fills 192 MiB so that the full copy takes a while (about a second):
    // the guest keeps writing through changing mappings meanwhile.
    VmmCommand::test_guest()
        .memory(MEMORY)
        .iommu()
        .vfio_user(&format!("{}{policy}", dev.arg(true)))
        .cmdline(&format!("tests=migrate_dma {params} touch=192"))
        .api_socket(api_socket)
        .counters()
        .envs(env)
        .start()
}

/// Starts a destination VM built like the source, waiting as `incoming` says.
fn destination(dev: &DeviceProcess, memory: &str, incoming: &[&str]) -> VmmProcess {
    destination_env(dev, memory, incoming, &[], "")
}

/// [`destination`] with environment variables (the hand-over fault hook) and more
/// `--vfio-user` options.
fn destination_env(
    dev: &DeviceProcess,
    memory: &str,
    incoming: &[&str],
    env: &[(&str, &str)],
    policy: &str,
) -> VmmProcess {
    VmmCommand::new()
        .memory(memory)
        .iommu()
        .vfio_user(&format!("{}{policy}", dev.arg(true)))
        .counters()
        .args(incoming)
        .envs(env)
        .start()
}

/// Every migration compares RAM page by page before the guest runs again.
const VERIFY: &str = r#","verify":true"#;

/// RAM pages of a 256 MiB guest.
const PAGES: u64 = 65536;

/// What a migration that tracked every device reports: every page verified, device dirty
/// reports read, pages found by every source, no device left untracked.
fn assert_mechanism(report: &serde_json::Value) {
    assert_migrated(report, PAGES);
    assert_mechanism_without_verify(report);
}

/// The report's mechanism, verify aside: device dirty reads, pages from the passthrough
/// device and the vCPUs, no untracked device.
fn assert_mechanism_without_verify(report: &serde_json::Value) {
    assert!(
        report["device_dirty_reads"].as_u64().unwrap() > 0,
        "{report}"
    );
    let by = &report["dirty_by_source"];
    assert!(by["passthrough"].as_u64().unwrap() > 0, "{report}");
    assert!(by["kvm"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        report["untracked_devices"],
        serde_json::json!([]),
        "{report}"
    );
}

fn migrate(api_socket: &Path, to: &Path, extra: &str) -> serde_json::Value {
    migration::migrate(api_socket, &format!("unix:{}", to.display()), extra)
}

/// [`source_env`] once the destination listens at `mig_sock` and the guest is ready to
/// migrate (`# migrate-ready` on its console).
fn ready_source(
    dev: &DeviceProcess,
    api_socket: &Path,
    mig_sock: &Path,
    params: &str,
    env: &[(&str, &str)],
    policy: &str,
) -> VmmProcess {
    let mut src = source_env(dev, api_socket, params, env, policy);
    wait_for_path(mig_sock);
    src.wait_console("# migrate-ready", DEADLINE);
    src
}

/// A destination waiting on a fresh socket (`to`), and a source running `migrate_dma` until
/// it migrates, ready; each with its own device process, kept alive by `_devices`.
struct ReadyPair {
    src: VmmProcess,
    dst: VmmProcess,
    api_sock: std::path::PathBuf,
    mig_sock: std::path::PathBuf,
    to: String,
    _devices: (DeviceProcess, DeviceProcess),
}

fn ready_pair() -> ReadyPair {
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (api_sock, mig_sock) = (scratch("api.sock"), scratch("mig.sock"));
    let to = format!("unix:{}", mig_sock.display());
    let dst = destination(&dev_b, MEMORY, &["--incoming", &to]);
    let src = ready_source(&dev_a, &api_sock, &mig_sock, UNTIL_MIGRATED, &[], "");
    ReadyPair {
        src,
        dst,
        api_sock,
        mig_sock,
        to,
        _devices: (dev_a, dev_b),
    }
}

#[test]
fn live_migration_loses_no_device_write() {
    let ReadyPair {
        src,
        dst,
        api_sock,
        mig_sock,
        to: _,
        _devices,
    } = ready_pair();
    // More rounds than a destination accepts are refused before anything is sent.
    let refused = migrate(&api_sock, &mig_sock, r#","max_rounds":63"#);
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("max_rounds 63 is more than 62, the most a destination accepts"),
        "{refused}"
    );
    // 62 rounds, the most a destination accepts, are accepted.
    let report = migrate(
        &api_sock,
        &mig_sock,
        &format!(r#"{VERIFY},"max_rounds":62"#),
    );
    assert_eq!(report["ok"], true, "{report}");
    assert_mechanism(&report);
    let rounds = report["rounds"].as_array().expect("rounds");
    let first = rounds[0]["pages"].as_u64().unwrap();
    assert!(
        (49152..=65536).contains(&first),
        "round 0 sends all RAM that holds data: {first} pages"
    );

    assert_handed_over(&src.wait(DEADLINE));
    let dst = guest_passed_on(dst);
    dst.assert_console("# migrate_dma: migrated after iteration");
    // The guest went on mapping and DMA-ing on the destination, through its new device.
    assert!(counter(&dst, "virtio-iommu", "map") > 10);
    assert!(counter(&dst, "vfio-user device", "dma_map_calls") > 10);
}

/// While a migration runs, the API's `pause` and `resume` are refused by name: a `resume`
/// must never run the guest during the stop-and-copy or the hand-over. The migration goes
/// on and succeeds.
/// Starts a migration with verify on a thread, 192 MiB at 64 MiB/s (the full copy takes
/// about 3 s), and returns once `status` shows it running; panics when it ended before.
fn slow_migration(api_sock: &Path, mig_sock: &Path) -> std::thread::JoinHandle<serde_json::Value> {
    let (a, m) = (api_sock.to_path_buf(), mig_sock.to_path_buf());
    let migrating = std::thread::spawn(move || {
        migrate(
            &a,
            &m,
            &format!(r#","verify":true,"max_bandwidth":{}"#, 64 << 20),
        )
    });
    let start = std::time::Instant::now();
    while api(api_sock, r#"{"cmd":"status"}"#)["migration"].is_null() {
        if migrating.is_finished() {
            panic!("the migration ended at once: {}", migrating.join().unwrap());
        }
        assert!(start.elapsed() < DEADLINE, "the migration never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    migrating
}

#[test]
fn pause_and_resume_are_refused_while_a_migration_runs() {
    let ReadyPair {
        src,
        dst,
        api_sock,
        mig_sock,
        to: _,
        _devices,
    } = ready_pair();
    // A paused guest is not migrated (a live migration would not be live): refused by
    // name, and it runs on once resumed.
    assert_eq!(api(&api_sock, r#"{"cmd":"pause"}"#)["ok"], true);
    let refused = migrate(&api_sock, &mig_sock, VERIFY);
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("the VM is paused; resume it first")),
        "{refused}"
    );
    assert_eq!(api(&api_sock, r#"{"cmd":"resume"}"#)["ok"], true);
    let migrating = slow_migration(&api_sock, &mig_sock);
    // `status` shows the full copy under way: round 0 of the RAM that holds data, part of it
    // sent (192 MiB at 64 MiB/s take about 3 s).
    let start = std::time::Instant::now();
    let st = loop {
        let st = api(&api_sock, r#"{"cmd":"status"}"#)["migration"].clone();
        if st["round_sent"].as_u64().unwrap_or(0) > 0 || start.elapsed() > DEADLINE {
            break st;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        (&st["phase"], &st["round"]),
        (&"copy".into(), &0.into()),
        "{st}"
    );
    let (total, sent) = (
        st["round_pages"].as_u64().unwrap(),
        st["round_sent"].as_u64().unwrap(),
    );
    assert!(
        (49152..=65536).contains(&total) && sent > 0 && sent < total,
        "{st}"
    );
    assert_eq!(st["pages_sent"], sent, "{st}");
    for what in ["pause", "resume"] {
        let r = api(&api_sock, &format!(r#"{{"cmd":"{what}"}}"#));
        assert_eq!(r["ok"], false, "{r}");
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains(&format!("{what}: a snapshot or migration is in progress")),
            "{r}"
        );
    }
    assert_migrated(&migrating.join().unwrap(), PAGES);
    assert_handed_over(&src.wait(DEADLINE));
    guest_passed_on(dst);
}

/// A guest that had a device hot-added (`--hotplug iommu=1`, slot 00:1f.0) migrates, verify
/// on, to a destination started with the devices the source has now: the hot-added one in
/// its slot (`slot=31`). While the migration runs, a hot-plug request is refused by name. On
/// the destination the device is the vIOMMU's endpoint and goes like a hot-added one.
#[test]
fn live_migration_after_a_hot_add() {
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (hot_a, hot_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (api_sock, dst_api, mig_sock) = (
        scratch("api.sock"),
        scratch("api.sock"),
        scratch("mig.sock"),
    );
    let to = format!("unix:{}", mig_sock.display());
    let dst = VmmCommand::new()
        .memory(MEMORY)
        .iommu()
        .flag("--hotplug", "iommu=1")
        .vfio_user(&dev_b.arg(true))
        .vfio_user(&format!("{},slot=31", hot_b.arg(true)))
        .api_socket(&dst_api)
        .counters()
        .args(["--incoming", &to])
        .start();
    let mut src = VmmCommand::test_guest()
        .memory(MEMORY)
        .iommu()
        .flag("--hotplug", "iommu=1")
        .vfio_user(&dev_a.arg(true))
        .cmdline("tests=migrate_dma until_migrated=1 iters=300 touch=192")
        .api_socket(&api_sock)
        .counters()
        .start();
    wait_for_path(&mig_sock);
    src.wait_console("# migrate-ready", DEADLINE);
    // The test guest does not drive hot-plug: the device is on the bus, not enabled.
    let req = serde_json::json!({"cmd": "add-device", "vfio-user": hot_a.arg(true), "wait": 1});
    let added = api(&api_sock, &req.to_string());
    assert_eq!(added["ok"], true, "{added}");
    assert_eq!(added["added"]["bdf"], "00:1f.0", "{added}");

    let migrating = slow_migration(&api_sock, &mig_sock);
    let req = serde_json::json!({"cmd": "remove-device", "id": added["added"]["id"], "wait": 1});
    let r = api(&api_sock, &req.to_string());
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("remove-device is refused until it ends"),
        "{r}"
    );
    let report = migrating.join().unwrap();
    assert_mechanism(&report);
    assert_handed_over(&src.wait(DEADLINE));

    // On the destination the device given by `slot=31` goes like a hot-added one. The test
    // guest never ejects: the request says so, and the device goes all the same.
    let removed = api(
        &dst_api,
        r#"{"cmd":"remove-device","id":"hotplug0","wait":1}"#,
    );
    assert_eq!(removed["ok"], false, "{removed}");
    let e = removed["error"].as_str().unwrap();
    assert!(
        e.contains("did not eject hotplug0 (00:1f.0)") && e.contains("mapped_bytes_left=0"),
        "{removed}"
    );
    let dst = guest_passed_on(dst);
    let line = dst
        .stderr
        .lines()
        .find(|l| l.contains("virtio-iommu 00:01.0"))
        .expect("the virtio-iommu's counters");
    assert!(line.contains(" endpoints=1 "), "{line}");
    drop((dev_a, dev_b, hot_a, hot_b));
}

/// A live migration with `--vfio-user ...{dma}` on both sides (device processes started with
/// `device`), verify on: the report's
/// mechanism holds, the guest's verdict on the destination finds every page it wrote. Returns
/// the destination's run.
fn live_migration_under(dma: &str, device: &[&str]) -> (serde_json::Value, vmm_tests::Run) {
    live_migration_with(dma, device, VERIFY)
}

/// [`live_migration_under`] with the migrate command's `extra` fields.
fn live_migration_with(
    dma: &str,
    device: &[&str],
    extra: &str,
) -> (serde_json::Value, vmm_tests::Run) {
    let (dev_a, dev_b) = (
        DeviceProcess::start_with(device),
        DeviceProcess::start_with(device),
    );
    let (api_sock, mig_sock) = (scratch("api.sock"), scratch("mig.sock"));
    let to = format!("unix:{}", mig_sock.display());
    let dst = destination_env(&dev_b, MEMORY, &["--incoming", &to], &[], dma);
    let src = ready_source(&dev_a, &api_sock, &mig_sock, UNTIL_MIGRATED, &[], dma);
    let report = migrate(&api_sock, &mig_sock, extra);
    eprintln!("migration report: {report}");
    assert_eq!(report["ok"], true, "{report}");
    if extra == VERIFY {
        assert_eq!(report["verified_pages"], PAGES, "{report}");
    }
    let src = src.wait(DEADLINE);
    assert_eq!(src.code(), 0, "{}", src.stderr);
    let dst = guest_passed_on(dst);
    (report, dst)
}

/// RAM split by the PCI hole and larger than 3 GiB: 3 GiB below the hole, 256 MiB from
/// 4 GiB (KVM memory slot 1, 3 GiB into the memfd). The guest (`high=1`) keeps its DMA
/// area, the values it expects there and the 192 MiB bulk fill above 4 GiB, so the device
/// writes, the vCPU writes and the full copy all land in the second region. Verify passes
/// on all 851,968 pages, and the guest finds every page on the destination. The verify
/// hashes skip the memfd's holes: neither side ends holding 3 GiB it never used.
#[test]
fn live_migration_with_ram_above_the_pci_hole() {
    const SPLIT: &str = "3328M";
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (api_sock, mig_sock) = (scratch("api.sock"), scratch("mig.sock"));
    let to = format!("unix:{}", mig_sock.display());
    let dst = destination(&dev_b, SPLIT, &["--incoming", &to]);
    let mut src = VmmCommand::test_guest()
        .memory(SPLIT)
        .iommu()
        .vfio_user(&dev_a.arg(true))
        .cmdline(&format!(
            "tests=migrate_dma {UNTIL_MIGRATED} touch=192 high=1"
        ))
        .api_socket(&api_sock)
        .counters()
        .start();
    wait_for_path(&mig_sock);
    src.wait_console("# migrate-ready", DEADLINE);
    src.wait_console(
        "# migrate_dma: buffers above 4 GiB from 0x100000000",
        DEADLINE,
    );
    let report = migrate(&api_sock, &mig_sock, VERIFY);
    eprintln!("migration report: {report}");
    assert_migrated(&report, 3328 << 8);
    assert_mechanism_without_verify(&report);
    let first = report["rounds"][0]["pages"].as_u64().unwrap();
    assert!(
        (49152..=65536 + 8192).contains(&first),
        "round 0 sends the RAM that holds data, not the 3 GiB never touched: {first} pages"
    );
    assert_handed_over(&src.wait(DEADLINE));
    let dst = guest_passed_on(dst);
    dst.assert_console("# migrate_dma: migrated after iteration");
}

/// The dirty log (`--track-dirty`) of a device writing above the PCI hole, in a VM whose RAM
/// is split by it: exactly the pages the guest had the device write, all above 4 GiB (its
/// DMA area, its canary page and a 1 MiB bulk fill), named by their own page numbers.
#[test]
fn the_dirty_log_names_device_writes_above_the_pci_hole() {
    let dev = DeviceProcess::start();
    let log = scratch("dirty.log");
    let run = VmmCommand::test_guest()
        .memory("3328M")
        .iommu()
        .vfio_user(&dev.arg(true))
        .arg("--track-dirty")
        .flag("--dirty-log-out", log.display().to_string())
        .cmdline("tests=migrate_dma iters=16 touch=1 high=1")
        .run(DEADLINE);
    eprintln!("{}\n{}", run.console, run.stderr);
    assert_eq!(run.code(), 0, "the guest's verdict");
    run.assert_console("ok 1 - migrate_dma");
    let line = run
        .console
        .lines()
        .find_map(|l| l.strip_prefix("# migrate_dma: device writes pages "))
        .expect("the guest names the pages the device writes");
    // "0xA +N, 0xC +1, 0xB +M" (area, canary, bulk): 16 iterations fill every window of the
    // area once.
    let runs: Vec<String> = line
        .split(", ")
        .map(|r| r.trim_start_matches("0x").replace(" +", "+"))
        .map(|r| {
            let (first, n) = r.split_once('+').unwrap();
            format!("{first}+{:x}", n.parse::<u64>().unwrap())
        })
        .collect();
    let want = vmm_tests::page_set(runs.iter().map(String::as_str));
    assert!(want.first().is_some_and(|&p| p >= 0x10_0000), "{want:?}");
    assert_eq!(want.len(), 513);
    vmm_tests::assert_same_pages(
        "dirty log above the PCI hole",
        &want,
        &vmm_tests::dirty_log_pages(&log),
    );
    let _ = std::fs::remove_file(&log);
}

/// Under `dma=fault` on both sides: the source's host mappings exist only where the device
/// asked, its dirty reports cover those, and the destination's device (a new process with
/// nothing mapped) gets its mappings back through its own page requests. Nothing is lost:
/// `verify` passes and the guest finds every page it wrote.
#[test]
fn live_migration_under_dma_fault_loses_no_device_write() {
    let (report, dst) = live_migration_under(",dma=fault", &[]);
    assert_mechanism(&report);
    // The destination's device asked for its mappings, and every host map was one of those.
    let c = |k| counter(&dst, "vfio-user device", k);
    assert!(c("device_page_requests") > 0);
    assert_eq!(c("dma_map_calls"), c("installs"));
    assert_eq!(c("device_timeouts"), 0);
}

/// The figure: downtime and total time of a live migration without `verify` (whose hashing
/// would dominate), the device moved with the standard messages (`DEVICE_FEATURE`
/// `MIG_DEVICE_STATE`, `MIG_DATA_READ`/`WRITE`, `DMA_LOGGING_REPORT`). Correctness still
/// comes from the guest: every page it had the device write holds its last value.
#[test]
fn migration_downtime_with_the_standard_messages() {
    let (report, _) = live_migration_with("", &[], "");
    assert_mechanism_without_verify(&report);
    eprintln!(
        "figure: live migration of {} MiB with the device behind the vIOMMU (standard \
         messages, no verify): downtime {} ms, total {} ms, {} rounds, {} pages in the \
         stop-and-copy",
        256,
        report["downtime_ms"],
        report["total_ms"],
        report["rounds"].as_array().map_or(0, Vec::len),
        report["final_pages"]
    );
}

/// Under `dma=messages` on both sides: the device reaches guest memory only by message on
/// either side, and the destination's table is rebuilt from the restored vIOMMU. Its writes
/// go through the VMM's own memory, whose dirty bitmap sees them: even a device whose DMA
/// log reports nothing (`--dirty-log empty`, which fails verify under `dma=shared`: see
/// `a_device_that_reports_nothing_fails_verify`) loses nothing.
#[test]
fn live_migration_under_dma_messages_loses_no_device_write() {
    let (report, dst) = live_migration_under(",dma=messages", &["--dirty-log", "empty"]);
    // The device's log said nothing; the VMM's bitmap had every page the device wrote.
    let by = &report["dirty_by_source"];
    assert_eq!(by["passthrough"], 0, "{report}");
    assert!(by["vmm_devices"].as_u64().unwrap() > 0, "{report}");
    let c = |k| counter(&dst, "vfio-user device", k);
    assert!(c("dma_messages_written") > 0, "{}", dst.stderr);
    assert_eq!(c("dma_messages_refused"), 0);
}

/// Starts a source and a destination, waits until the guest is busy, migrates with `extra`
/// and returns the report, the source (still alive) and the destination.
fn migration_with(
    dev_a: &DeviceProcess,
    dev_b: &DeviceProcess,
    params: &str,
    extra: &str,
    src_env: &[(&str, &str)],
    dst_env: &[(&str, &str)],
) -> (
    serde_json::Value,
    VmmProcess,
    VmmProcess,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let (api_sock, mig_sock, api_dst) = (
        scratch("api.sock"),
        scratch("mig.sock"),
        scratch("api-dst.sock"),
    );
    let to = format!("unix:{}", mig_sock.display());
    let api_dst_arg = api_dst.display().to_string();
    let dst = destination_env(
        dev_b,
        MEMORY,
        &["--incoming", &to, "--api-socket", &api_dst_arg],
        dst_env,
        "",
    );
    let src = ready_source(dev_a, &api_sock, &mig_sock, params, src_env, "");
    let report = migrate(&api_sock, &mig_sock, extra);
    eprintln!("migration report: {report}");
    (report, src, dst, api_sock, api_dst)
}

/// The source of a refused migration runs the guest on; it is stopped through the API.
fn source_runs_on(mut src: VmmProcess, api_sock: &Path) {
    assert_eq!(api(api_sock, r#"{"cmd":"status"}"#)["state"], "running");
    let before = src.console().matches("# migrate_dma: iteration").count();
    src.wait_console(
        &format!("# migrate_dma: iteration {}", (before + 2) * 100),
        DEADLINE,
    );
    assert_eq!(api(api_sock, r#"{"cmd":"quit"}"#)["ok"], true);
    assert_eq!(src.wait(DEADLINE).code(), 0);
}

/// The destination's run once the guest ended there: status 0 (the guest's verdict), and
/// `migrate_dma` passed with every page it had the device write intact.
fn guest_passed_on(dst: VmmProcess) -> vmm_tests::Run {
    let dst = dst.wait(DEADLINE);
    eprintln!("{}\n{}", dst.console, dst.stderr);
    assert_eq!(dst.code(), 0, "the guest's verdict on the destination");
    dst.assert_console("ok 1 - migrate_dma");
    dst.assert_console("0 stale pages seen before a refill, 0 of 256 pages wrong at the end");
    dst
}

/// The destination dropped the guest without running it.
fn destination_discarded(dst: VmmProcess) {
    destination_never_ran(dst, "the source aborted the migration");
}

/// The destination ended with status 1, saying `why`, without ever running the guest.
fn destination_never_ran(dst: VmmProcess, why: &str) {
    assert_never_ran(&dst.wait(DEADLINE), why, "migrate_dma");
}

#[test]
fn without_device_dirty_tracking_verify_fails_and_the_source_resumes() {
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let extra = r#","verify":true,"device_dirty_tracking":false"#;
    let (report, src, dst, api_sock, _) =
        migration_with(&dev_a, &dev_b, UNTIL_MIGRATED, extra, &[], &[]);
    // Writes the device made during the migration never reached the destination.
    assert_verify_failed(&report);
    let err = report["error"].as_str().unwrap();
    assert!(err.contains(" 0x"), "the differing GPAs are listed: {err}");
    destination_discarded(dst);
    source_runs_on(src, &api_sock);
}

#[test]
fn a_device_that_reports_nothing_fails_verify() {
    // The device claims dirty tracking and never reports a page: nothing in the report
    // tells it from an idle device; the RAM comparison does.
    let (dev_a, dev_b) = (
        DeviceProcess::start_with(&["--dirty-log", "empty"]),
        DeviceProcess::start(),
    );
    let (report, src, dst, api_sock, _) =
        migration_with(&dev_a, &dev_b, UNTIL_MIGRATED, VERIFY, &[], &[]);
    assert_verify_failed(&report);
    destination_discarded(dst);
    source_runs_on(src, &api_sock);
}

#[test]
fn a_device_without_dirty_tracking_is_copied_in_full_and_reported_untracked() {
    let (dev_a, dev_b) = (
        DeviceProcess::start_with(&["--dirty-log", "off"]),
        DeviceProcess::start(),
    );
    let (report, src, dst, _, _) = migration_with(&dev_a, &dev_b, UNTIL_MIGRATED, VERIFY, &[], &[]);
    // Its writable mappings count dirty at every harvest: nothing is lost, verify passes,
    // and the report names it (so the tracking test's assertion would fail).
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["verified_pages"], PAGES);
    let untracked = report["untracked_devices"].as_array().unwrap();
    assert_eq!(untracked.len(), 1, "{report}");
    assert!(
        untracked[0].as_str().unwrap().contains("vfio-user"),
        "{report}"
    );
    assert_eq!(src.wait(DEADLINE).code(), 0);
    guest_passed_on(dst);
}

/// No ACK reaches the source (dropped, or later than its timeout): it resumes and tells
/// the destination, which discards the guest without ever running it.
#[test]
fn a_lost_or_late_ack_resumes_the_source_and_the_destination_discards() {
    for fault in ["drop-ack", "delay-ack=4000"] {
        let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
        let (report, src, dst, api_sock, _) = migration_with(
            &dev_a,
            &dev_b,
            UNTIL_MIGRATED,
            r#","verify":true,"timeout_ms":1500"#,
            &[],
            &[("VMM_TEST_HANDOVER_FAULT", fault)],
        );
        assert_eq!(report["ok"], false, "{fault}: {report}");
        assert!(
            report["error"].as_str().unwrap().contains("no ACK"),
            "{fault}: {report}"
        );
        destination_discarded(dst);
        source_runs_on(src, &api_sock);
    }
}

/// The COMMIT is lost and the destination has no API socket through which a user could
/// decide: it ends, saying why, without ever running the guest.
#[test]
fn a_destination_without_an_api_never_runs_the_guest_without_a_commit() {
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (api_sock, mig_sock) = (scratch("api.sock"), scratch("mig.sock"));
    let to = format!("unix:{}", mig_sock.display());
    let dst = destination_env(&dev_b, MEMORY, &["--incoming", &to], &[], "");
    let src = ready_source(
        &dev_a,
        &api_sock,
        &mig_sock,
        UNTIL_MIGRATED,
        &[("VMM_TEST_HANDOVER_FAULT", "drop-commit")],
        "",
    );
    let report = migrate(&api_sock, &mig_sock, r#","verify":true,"timeout_ms":1500"#);
    assert_eq!(report["ok"], false, "{report}");
    destination_never_ran(dst, "no --api-socket to decide: the guest is not run");
    assert_eq!(
        api(&api_sock, r#"{"cmd":"status"}"#)["state"],
        "handover-unconfirmed"
    );
    assert_eq!(api(&api_sock, r#"{"cmd":"quit"}"#)["ok"], true);
    assert_eq!(src.wait(DEADLINE).code(), 0);
}

/// The COMMIT is lost: the source stopped for good and says so, the destination waits and
/// says so; neither runs the guest until the user decides, then exactly one does.
#[test]
fn a_lost_commit_leaves_both_stopped_until_the_user_decides() {
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (report, src, mut dst, api_sock, api_dst) = migration_with(
        &dev_a,
        &dev_b,
        UNTIL_MIGRATED,
        r#","verify":true,"timeout_ms":1500"#,
        &[("VMM_TEST_HANDOVER_FAULT", "drop-commit")],
        &[],
    );
    assert_eq!(report["ok"], false, "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("hand-over unconfirmed"),
        "{report}"
    );
    let s = api(&api_sock, r#"{"cmd":"status"}"#);
    assert_eq!(s["state"], "handover-unconfirmed", "{s}");
    assert!(s["resolve"].as_str().unwrap().contains("force"), "{s}");
    let r = api(&api_sock, r#"{"cmd":"resume"}"#);
    assert_eq!(r["ok"], false, "a plain resume is refused: {r}");
    dst.wait_stderr("no COMMIT from the source", DEADLINE);
    let d = api(&api_dst, r#"{"cmd":"status"}"#);
    assert_eq!(d["state"], "awaiting-commit", "{d}");
    assert!(d["resolve"].as_str().unwrap().contains("\"commit\""), "{d}");
    // Neither guest runs: the source's console does not move, the destination's is empty.
    let src_console = src.console();
    assert_eq!(
        api(&api_sock, r#"{"cmd":"status"}"#)["state"],
        "handover-unconfirmed"
    );
    assert_eq!(src.console(), src_console);
    assert!(!dst.console().contains("migrate_dma"));
    // The user decides: the destination runs it, the source quits.
    assert_eq!(api(&api_dst, r#"{"cmd":"commit"}"#)["ok"], true);
    assert_eq!(api(&api_sock, r#"{"cmd":"quit"}"#)["ok"], true);
    assert_eq!(
        src.wait(DEADLINE).console,
        src_console,
        "the source never ran again"
    );
    guest_passed_on(dst);
}

/// The source dies after the ACK, before its COMMIT: the destination does not run the guest
/// on its own; the user's commit runs it there, intact.
#[test]
fn a_source_killed_after_the_ack_leaves_the_destination_waiting() {
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (api_sock, mig_sock, api_dst) = (
        scratch("api.sock"),
        scratch("mig.sock"),
        scratch("api-dst.sock"),
    );
    let to = format!("unix:{}", mig_sock.display());
    let api_dst_arg = api_dst.display().to_string();
    let mut dst = destination(
        &dev_b,
        MEMORY,
        &["--incoming", &to, "--api-socket", &api_dst_arg],
    );
    let mut src = ready_source(
        &dev_a,
        &api_sock,
        &mig_sock,
        UNTIL_MIGRATED,
        &[("VMM_TEST_HANDOVER_FAULT", "stall-before-commit=60000")],
        "",
    );
    // The migrate call blocks until the hand-over ends: issue it from a thread.
    let (a, m) = (api_sock.clone(), mig_sock.clone());
    let caller = std::thread::spawn(move || migrate(&a, &m, VERIFY));
    src.wait_stderr("ACK received; committing in", DEADLINE);
    let src_console = src.console();
    let dead = src.kill();
    assert_eq!(dead.console, src_console);
    let _ = caller.join();
    dst.wait_stderr("no COMMIT from the source", DEADLINE);
    assert_eq!(
        api(&api_dst, r#"{"cmd":"status"}"#)["state"],
        "awaiting-commit"
    );
    assert!(!dst.console().contains("migrate_dma"));
    assert_eq!(api(&api_dst, r#"{"cmd":"commit"}"#)["ok"], true);
    guest_passed_on(dst);
}

#[test]
fn snapshot_then_restore_resumes_with_the_iommu_state() {
    let (dev_a, dev_b, dev_c) = (
        DeviceProcess::start(),
        DeviceProcess::start(),
        DeviceProcess::start(),
    );
    let (api_sock, api_b) = (scratch("api.sock"), scratch("api-b.sock"));
    let dir = scratch("snapshot");
    let mut src = source(&dev_a, &api_sock, UNTIL_MIGRATED);
    src.wait_console("# migrate-ready", DEADLINE);
    // A link planted at the snapshot's partial file is not followed.
    std::fs::create_dir_all(&dir).unwrap();
    let victim = scratch("victim");
    std::fs::write(&victim, b"not a snapshot").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("snapshot.vmm.partial")).unwrap();
    let snap = api(
        &api_sock,
        &format!(
            r#"{{"cmd":"snapshot","dir":"{}","verify":true}}"#,
            dir.display()
        ),
    );
    eprintln!("snapshot: {snap}");
    assert_eq!(snap["ok"], true, "{snap}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"not a snapshot");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("snapshot.vmm"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "snapshot mode {mode:o}");
    // The answer tells what was written: the file's bytes, the RAM that holds data (the
    // device's 192 MiB fill and the guest's own pages), and a copy that took some time.
    let file = std::fs::metadata(dir.join("snapshot.vmm")).unwrap().len();
    assert_eq!(snap["bytes"], file, "{snap}");
    let pages = snap["pages"].as_u64().unwrap();
    assert!((49152..=65536).contains(&pages), "{snap}");
    assert!(snap["total_ms"].as_u64().unwrap() > 0, "{snap}");
    // The source goes on after the snapshot; then it is stopped.
    assert_eq!(api(&api_sock, r#"{"cmd":"status"}"#)["state"], "running");
    assert_eq!(api(&api_sock, r#"{"cmd":"pause"}"#)["ok"], true);
    assert_eq!(api(&api_sock, r#"{"cmd":"status"}"#)["state"], "paused");
    assert_eq!(api(&api_sock, r#"{"cmd":"quit"}"#)["ok"], true);
    assert_eq!(src.wait(DEADLINE).code(), 0);

    // A truncated copy of the snapshot is refused with a clear error.
    let bad = scratch("snapshot-bad");
    std::fs::create_dir_all(&bad).unwrap();
    let bytes = std::fs::read(dir.join("snapshot.vmm")).unwrap();
    std::fs::write(bad.join("snapshot.vmm"), &bytes[..bytes.len() / 2]).unwrap();
    let bad_run = destination(&dev_c, MEMORY, &["--restore", bad.to_str().unwrap()]).wait(DEADLINE);
    assert_eq!(bad_run.code(), 1);
    assert!(
        bad_run
            .stderr
            .contains("vmm: error: the stream is truncated"),
        "{}",
        bad_run.stderr
    );

    // Restore through the API of a VM waiting with --incoming defer.
    let api_b_arg = api_b.display().to_string();
    let dst = destination(
        &dev_b,
        MEMORY,
        &["--incoming", "defer", "--api-socket", &api_b_arg],
    );
    assert_eq!(api(&api_b, r#"{"cmd":"status"}"#)["state"], "waiting");
    let r = api(
        &api_b,
        &format!(r#"{{"cmd":"restore","dir":"{}"}}"#, dir.display()),
    );
    assert_eq!(r["ok"], true, "{r}");
    let dst = dst.wait(DEADLINE);
    eprintln!("{}\n{}", dst.console, dst.stderr);
    assert_eq!(dst.code(), 0);
    // The guest picked up where the snapshot was taken: its domain, its canary mapping made
    // before the snapshot, and the transfer in flight all carried over; the RAM it loaded
    // matched the snapshot's hashes page by page.
    assert!(
        dst.stderr
            .contains(&format!("verify: all {PAGES} RAM pages match the snapshot")),
        "{}",
        dst.stderr
    );
    dst.assert_console("ok 1 - migrate_dma");
    assert!(
        !dst.console.contains("TAP version"),
        "the guest did not boot again"
    );
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(bad);
}

/// Starts a source (guest cases `params`) and a destination with `dst_memory`, migrates with
/// verify and expects a refusal: returns its error, the source (still running), the
/// destination and the source's API socket.
fn refused_migration(
    dev_a: &DeviceProcess,
    dev_b: &DeviceProcess,
    dst_memory: &str,
    params: &str,
) -> (String, VmmProcess, VmmProcess, std::path::PathBuf) {
    let (api_sock, mig_sock) = (scratch("api.sock"), scratch("mig.sock"));
    let to = format!("unix:{}", mig_sock.display());
    let dst = destination(dev_b, dst_memory, &["--incoming", &to]);
    let src = ready_source(dev_a, &api_sock, &mig_sock, params, &[], "");
    let r = migrate(&api_sock, &mig_sock, VERIFY);
    assert_eq!(r["ok"], false, "{r}");
    let err = r["error"].as_str().unwrap_or_default().to_string();
    (err, src, dst, api_sock)
}

/// A device server without `VFIO_DEVICE_FEATURE_MIGRATION` is refused before anything is
/// sent, by name, and the guest runs on.
#[test]
fn a_device_without_migration_is_refused_by_name() {
    let (dev_a, dev_b) = (
        DeviceProcess::start_with(&["--no-migration"]),
        DeviceProcess::start(),
    );
    let (err, src, _dst, api_sock) = refused_migration(&dev_a, &dev_b, MEMORY, "iters=100000");
    assert!(
        err.contains(&format!("vfio-user device {}", dev_a.socket.display()))
            && err.contains("cannot be migrated"),
        "{err}"
    );
    source_runs_on(src, &api_sock);
}

#[test]
fn a_refused_migration_leaves_the_guest_running() {
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    // The destination has less memory: it refuses the stream's configuration.
    let (err, src, dst, _) = refused_migration(&dev_a, &dev_b, "128M", "iters=200");
    assert!(
        err.contains("the guest has 256 MiB of RAM, this VM 128 MiB"),
        "{err}"
    );
    let dst = dst.wait(DEADLINE);
    assert_eq!(dst.code(), 1);
    assert!(
        dst.stderr.contains("vmm: error: incompatible machines"),
        "{}",
        dst.stderr
    );
    // The source's guest carries on and finishes its run with every write in place.
    let src = src.wait(DEADLINE);
    eprintln!("{}", src.console);
    assert_eq!(src.code(), 0, "{}", src.stderr);
    src.assert_console("ok 1 - migrate_dma");
}

#[test]
fn garbage_on_the_incoming_socket_is_refused() {
    let dev = DeviceProcess::start();
    let mig_sock = scratch("mig.sock");
    let to = format!("unix:{}", mig_sock.display());
    let mut dst = destination(&dev, MEMORY, &["--incoming", &to]);
    wait_for_path(&mig_sock);
    // A local user of another uid, let in by the socket's mode, is refused by its uid
    // (`SO_PEERCRED`) before a byte is read, and the destination waits on.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&mig_sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    if run_as_nobody(
        "vmm-ctl",
        &["--socket".as_ref(), mig_sock.as_os_str(), "status".as_ref()],
    )
    .is_some()
    {
        dst.wait_stderr(
            "migration: refused a peer on unix:",
            Duration::from_secs(10),
        );
        assert!(
            dst.stderr_so_far()
                .contains("the peer's uid 65534 is neither the VMM's (0) nor root"),
            "{}",
            dst.stderr_so_far()
        );
    } else {
        eprintln!("SKIP: another uid's peer needs root to start it");
    }
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&mig_sock).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    }
    let run = dst.wait(DEADLINE);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr
            .contains("vmm: error: not a VMM snapshot or migration stream (bad magic)"),
        "{}",
        run.stderr
    );
}

/// A source that trickles its stream (here the header, a byte every 200 ms) is cut off once
/// the destination's bound on the whole stream has passed (shortened to 1.5 s by a test
/// hook; an hour by default): refused by name, before any ACK, the guest never run.
#[test]
fn a_trickling_source_is_refused_before_the_ack() {
    let dev = DeviceProcess::start();
    let mig_sock = scratch("mig.sock");
    let to = format!("unix:{}", mig_sock.display());
    let dst = destination_env(
        &dev,
        MEMORY,
        &["--incoming", &to],
        &[("VMM_TEST_HANDOVER_FAULT", "stream-ms=1500")],
        "",
    );
    wait_for_path(&mig_sock);
    let mut header = Vec::new();
    vmm::migration::stream::StreamWriter::new(&mut header).unwrap();
    let whole = header.len();
    let mut s = std::os::unix::net::UnixStream::connect(&mig_sock).unwrap();
    let sent = std::thread::spawn(move || {
        use std::io::Write;
        header
            .iter()
            .take_while(|b| {
                std::thread::sleep(Duration::from_millis(200));
                s.write_all(&[**b]).is_ok()
            })
            .count()
    });
    assert_never_ran(
        &dst.wait(DEADLINE),
        "the source took more than 1.5 s",
        "migrate_dma",
    );
    assert!(
        sent.join().unwrap() < whole,
        "the whole header went through"
    );
}

/// `vmm-ctl` drives a whole migration: status, a verified migrate with its readable report,
/// and a non-zero exit status for a refused command.
#[test]
fn the_control_client_drives_a_migration() {
    let ctl = |sock: &Path, args: &[&str]| {
        let out = std::process::Command::new(vmm_tests::bin("vmm-ctl"))
            .arg("--socket")
            .arg(sock)
            .args(args)
            .output()
            .expect("run vmm-ctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let ReadyPair {
        src,
        dst,
        api_sock,
        to,
        _devices,
        ..
    } = ready_pair();
    let (code, out, _) = ctl(&api_sock, &["status"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("running: 256 MiB, 1 vCPUs"), "{out}");
    let (code, out, _) = ctl(&api_sock, &["--json", "status"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["state"],
        "running"
    );
    let (code, _, err) = ctl(&api_sock, &["restore", "/nonexistent"]);
    assert_eq!(code, Some(1), "a refused command fails");
    assert!(err.contains("the VM is already running"), "{err}");
    let (code, out, err) = ctl(&api_sock, &["migrate", &to, "--verify"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains(&format!("verify: {PAGES} RAM pages identical")),
        "{out}"
    );
    assert!(
        out.contains("round 0: ") && out.ends_with("migrated\n"),
        "{out}"
    );
    assert!(out.contains("untracked devices: none"), "{out}");
    assert_eq!(src.wait(DEADLINE).code(), 0);
    let dst = dst.wait(DEADLINE);
    assert_eq!(dst.code(), 0);
    dst.assert_console("ok 1 - migrate_dma");
    // Nobody listens any more.
    let (code, _, err) = ctl(&api_sock, &["status"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("vmm-ctl: cannot connect to"), "{err}");
}
