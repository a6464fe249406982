//! Live migration and snapshots with a passthrough device behind the vIOMMU, as real
//! processes: two VMMs and two DMA test device processes. The fast test guest's
//! `migrate_dma` case keeps the device writing a known value into guest memory by DMA through
//! mappings that change every iteration (map, fill, unmap), checks before every refill that
//! the previous fill is still there, and checks every page at the end.

use std::path::Path;
use std::time::Duration;

use vmm_tests::{api, bin, counter, scratch, DeviceProcess, VmmProcess};

const DEADLINE: Duration = Duration::from_secs(300);
const MEMORY: &str = "256M";

fn guest() -> String {
    bin("test-guest").display().to_string()
}

/// The guest keeps DMA-ing until it finds itself on another device process (migrated or
/// restored), then does 40 more iterations there: enough to revisit every window of its
/// area, whatever the time the migration takes.
const UNTIL_MIGRATED: &str = "until_migrated=1 iters=40";

/// Starts a source VM running `migrate_dma` (with `params`) with an API socket.
fn source(dev: &DeviceProcess, api_socket: &Path, params: &str) -> VmmProcess {
    let g = guest();
    let vfio = dev.arg(true);
    let api = api_socket.display().to_string();
    // The device first fills 192 MiB so that the full copy takes a while (about a second):
    // the guest keeps writing through changing mappings meanwhile.
    let cmdline = format!("tests=migrate_dma {params} touch=192");
    VmmProcess::start(&[
        "--kernel",
        &g,
        "--memory",
        MEMORY,
        "--iommu",
        "--vfio-user",
        &vfio,
        "--cmdline",
        &cmdline,
        "--api-socket",
        &api,
        "--counters",
    ])
}

/// Starts a destination VM built like the source, waiting as `incoming` says.
fn destination(dev: &DeviceProcess, memory: &str, incoming: &[&str]) -> VmmProcess {
    let vfio = dev.arg(true);
    let mut args = vec![
        "--memory",
        memory,
        "--iommu",
        "--vfio-user",
        &vfio,
        "--counters",
    ];
    args.extend_from_slice(incoming);
    VmmProcess::start(&args)
}

fn migrate(api_socket: &Path, to: &Path, extra: &str) -> serde_json::Value {
    api(
        api_socket,
        &format!(r#"{{"cmd":"migrate","to":"unix:{}"{extra}}}"#, to.display()),
    )
}

/// Waits until `path` exists (the destination listens).
fn wait_for(path: &Path) {
    let start = std::time::Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn live_migration_loses_no_device_write() {
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (api_sock, mig_sock) = (scratch("api.sock"), scratch("mig.sock"));
    let to = format!("unix:{}", mig_sock.display());
    let dst = destination(&dev_b, MEMORY, &["--incoming", &to]);
    let mut src = source(&dev_a, &api_sock, UNTIL_MIGRATED);
    wait_for(&mig_sock);
    src.wait_console("# migrate-ready", DEADLINE);
    let report = migrate(&api_sock, &mig_sock, "");
    eprintln!("migration report: {report}");
    assert_eq!(report["ok"], true, "{report}");
    let rounds = report["rounds"].as_array().expect("rounds");
    let first = rounds[0]["pages"].as_u64().unwrap();
    assert!(
        (49152..=65536).contains(&first),
        "round 0 sends all RAM that holds data: {first} pages"
    );

    let src = src.wait(DEADLINE);
    assert_eq!(src.code(), 0, "{}", src.stderr);
    assert!(
        src.stderr.contains("guest ended (migrated to unix:"),
        "{}",
        src.stderr
    );
    let dst = dst.wait(DEADLINE);
    eprintln!("{}\n{}", dst.console, dst.stderr);
    assert_eq!(dst.code(), 0, "the guest's verdict on the destination");
    dst.assert_console("ok 1 - migrate_dma");
    dst.assert_console("# migrate_dma: migrated after iteration");
    dst.assert_console("0 stale pages seen before a refill, 0 of 256 pages wrong at the end");
    // The guest went on mapping and DMA-ing on the destination, through its new device.
    assert!(counter(&dst, "virtio-iommu", "map") > 10);
    assert!(counter(&dst, "vfio-user device", "dma_map_calls") > 10);
}

#[test]
fn without_device_dirty_tracking_writes_are_lost() {
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (api_sock, mig_sock) = (scratch("api.sock"), scratch("mig.sock"));
    let to = format!("unix:{}", mig_sock.display());
    let dst = destination(&dev_b, MEMORY, &["--incoming", &to]);
    let mut src = source(&dev_a, &api_sock, UNTIL_MIGRATED);
    wait_for(&mig_sock);
    src.wait_console("# migrate-ready", DEADLINE);
    let report = migrate(&api_sock, &mig_sock, r#","device_dirty_tracking":false"#);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(src.wait(DEADLINE).code(), 0);
    let dst = dst.wait(DEADLINE);
    eprintln!("{}", dst.console);
    // The check can fail: writes the device made during the migration never reached the
    // destination, and the guest sees stale pages.
    assert_ne!(dst.code(), 0);
    dst.assert_console("not ok 1 - migrate_dma # pages lost device writes");
    dst.assert_console("is stale");
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
    let snap = api(
        &api_sock,
        &format!(r#"{{"cmd":"snapshot","dir":"{}"}}"#, dir.display()),
    );
    eprintln!("snapshot: {snap}");
    assert_eq!(snap["ok"], true, "{snap}");
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
    // before the snapshot, and the transfer in flight all carried over.
    dst.assert_console("ok 1 - migrate_dma");
    assert!(
        !dst.console.contains("TAP version"),
        "the guest did not boot again"
    );
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(bad);
}

#[test]
fn a_refused_migration_leaves_the_guest_running() {
    let (dev_a, dev_b) = (DeviceProcess::start(), DeviceProcess::start());
    let (api_sock, mig_sock) = (scratch("api.sock"), scratch("mig.sock"));
    let to = format!("unix:{}", mig_sock.display());
    // The destination has less memory: it refuses the stream's configuration.
    let dst = destination(&dev_b, "128M", &["--incoming", &to]);
    let mut src = source(&dev_a, &api_sock, "iters=200");
    wait_for(&mig_sock);
    src.wait_console("# migrate-ready", DEADLINE);
    let r = migrate(&api_sock, &mig_sock, "");
    assert_eq!(r["ok"], false, "{r}");
    let err = r["error"].as_str().unwrap();
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
    let dst = destination(&dev, MEMORY, &["--incoming", &to]);
    wait_for(&mig_sock);
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
