//! Hot-plug with the project's Linux guest: ACPI PCI hot-plug through the Generic Event
//! Device, Linux's acpiphp, the VIOT naming the hot-plug slots behind the virtio-iommu, and
//! the built-in DMA suite (`vmm_dmatest.hotplug=N`: it waits for N devices added after boot
//! and runs on each).
//!
//! The guest boots with the virtio-iommu and no DMA test device. A device is hot-added
//! behind the vIOMMU through the API; the suite binds to it and passes (fault cases
//! included) with the vIOMMU's counters showing the new endpoint attached; it is
//! hot-removed, the guest ejecting it, with no mapping left for it in the vIOMMU nor on the
//! device server, and its server sees the connection close; then two devices are added at
//! once, a second one behind the vIOMMU in the same slot and one outside it, and both pass.
//! The verdict is the suite's, through the test-exit port, after the last device.
//!
//! A second guest ignores hot-plug (`acpiphp.disable=1`): every request that must fail
//! fails with its error and changes nothing, and the devices it never ejects are torn down
//! at the deadline, with every host mapping gone and their connections closed.

use std::path::Path;
use std::time::{Duration, Instant};

use vmm_tests::{
    assert_same_pages, check_suites_skipping, counter, dirty_log_pages, guest_kernel,
    guest_written_pages, scratch, DeviceProcess, VmmProcess,
};

const DEADLINE: Duration = Duration::from_secs(900);

/// The virtio-iommu's counters line, through the API.
fn viommu_counters(vmm: &mut VmmProcess, api: &Path) -> String {
    let c = vmm.api(api, r#"{"cmd":"counters"}"#);
    c["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .filter_map(|l| l.as_str())
        .find(|l| l.starts_with("virtio-iommu"))
        .expect("a virtio-iommu line")
        .to_string()
}

/// `key=value` of a counters line, as text.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// `add-device` of `dev` waiting `wait` seconds: the whole answer.
fn try_add(
    vmm: &mut VmmProcess,
    api: &Path,
    dev: &DeviceProcess,
    iommu: bool,
    wait: u64,
) -> serde_json::Value {
    let req = serde_json::json!({"cmd": "add-device", "vfio-user": dev.arg(iommu), "wait": wait});
    vmm.api(api, &req.to_string())
}

/// `add-device` of `dev`, which the guest must take: what it added.
fn add(vmm: &mut VmmProcess, api: &Path, dev: &DeviceProcess, iommu: bool) -> serde_json::Value {
    let a = try_add(vmm, api, dev, iommu, 300);
    assert_eq!(a["ok"], true, "add-device: {a}\n{}", vmm.stderr_so_far());
    assert_eq!(
        a["added"]["enabled"], true,
        "the guest did not enable the device: {a}"
    );
    a["added"].clone()
}

/// `remove-device ID` waiting `wait` seconds: what was removed.
fn remove(
    vmm: &mut VmmProcess,
    api: &Path,
    id: &serde_json::Value,
    wait: u64,
) -> serde_json::Value {
    let req = serde_json::json!({"cmd": "remove-device", "id": id, "wait": wait});
    let r = vmm.api(api, &req.to_string());
    assert_eq!(r["ok"], true, "remove-device: {r}\n{}", vmm.stderr_so_far());
    r["removed"].clone()
}

/// `remove-device ID` of a device the guest does not eject within `wait` seconds: the
/// request fails saying so, and the device is torn down all the same. Returns the figures
/// the error gives (`host_maps=N host_unmaps=N mapped_bytes_left=N`).
fn remove_forced(vmm: &mut VmmProcess, api: &Path, id: &serde_json::Value, wait: u64) -> String {
    let req = serde_json::json!({"cmd": "remove-device", "id": id, "wait": wait});
    let r = vmm.api(api, &req.to_string());
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap().to_string();
    assert!(
        e.contains("the guest did not eject") && e.contains("torn down"),
        "{e}"
    );
    e
}

/// Waits for the device process to end (the VMM closed its connection).
fn assert_connection_closed(dev: &mut DeviceProcess) {
    let start = Instant::now();
    while dev.child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the device server still runs: its connection was not closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Linux guest with the vIOMMU, one hot-plug slot behind it and one outside it, the API
/// at `api`, dirty tracking from boot with the log written to `dirty_log` at the end, and
/// `extra` on its command line.
fn start_guest(api: &Path, dirty_log: &Path, extra: &str) -> VmmProcess {
    let g = guest_kernel();
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 vmm_dmatest.cycles=300 vmm_dmatest.samples=30 {extra}"
    );
    let mut args = vec![
        "--kernel",
        g.vmlinux.to_str().unwrap(),
        "--initramfs",
        g.initramfs.to_str().unwrap(),
        "--memory",
        "256M",
        "--iommu",
        "--hotplug",
        "iommu=1,direct=1",
        "--api-socket",
        api.to_str().unwrap(),
        "--counters",
        "--cmdline",
        &cmdline,
    ];
    // A migration source tracks dirty pages for the migration only.
    if !dirty_log.as_os_str().is_empty() {
        args.extend([
            "--track-dirty",
            "--dirty-log-out",
            dirty_log.to_str().unwrap(),
        ]);
    }
    VmmProcess::start(&args)
}

#[test]
fn linux_hotplug_adds_removes_and_adds_again() {
    let (api, dirty_log) = (scratch("api.sock"), scratch("dirty.log"));
    let mut vmm = start_guest(&api, &dirty_log, "vmm_dmatest.hotplug=3");
    vmm.wait_console("waiting for hot-plugged device 1 of 3", DEADLINE);
    let before = viommu_counters(&mut vmm, &api);
    assert_eq!(field(&before, "attached"), "none", "{before}");

    // First device: behind the vIOMMU, in the slot the VIOT names (00:1e.0, endpoint 0xf0).
    let mut dev1 = DeviceProcess::start();
    let a = add(&mut vmm, &api, &dev1, true);
    assert_eq!(a["bdf"], "00:1e.0", "{a}");
    vmm.wait_console("hot-plugged device 1 of 3 done", DEADLINE);
    let during = viommu_counters(&mut vmm, &api);
    assert!(
        field(&during, "attached")
            .split(',')
            .any(|e| e.starts_with("0xf0:")),
        "the hot-added endpoint is not attached: {during}"
    );
    assert!(
        field(&during, "map").parse::<u64>().unwrap() > 0,
        "{during}"
    );

    let r = remove(&mut vmm, &api, &a["id"], 300);
    assert_eq!(r["ejected"], true, "the guest did not eject it: {r}");
    assert_eq!(
        r["mapped_bytes_left"], 0,
        "mappings left on the device server: {r}"
    );
    assert!(r["host_maps"].as_u64().unwrap() > 0, "{r}");
    assert_connection_closed(&mut dev1);
    let after = viommu_counters(&mut vmm, &api);
    assert_eq!(field(&after, "attached"), "none", "{after}");
    assert_eq!(field(&after, "endpoints"), "0", "{after}");
    assert_eq!(field(&after, "mapped_pages"), "0", "{after}");
    // The id is gone with it.
    let req = serde_json::json!({"cmd": "remove-device", "id": a["id"], "wait": 1});
    let again = vmm.api(&api, &req.to_string());
    assert_eq!(again["ok"], false, "{again}");
    assert!(
        again["error"]
            .as_str()
            .unwrap()
            .contains("no hot-added device"),
        "{again}"
    );

    // Two at once: a second device in the same slot behind the vIOMMU, one outside it.
    let dev2 = DeviceProcess::start();
    let dev3 = DeviceProcess::start();
    let b = add(&mut vmm, &api, &dev2, true);
    let c = add(&mut vmm, &api, &dev3, false);
    assert_eq!(b["bdf"], "00:1e.0", "{b}");
    assert_eq!(c["bdf"], "00:1f.0", "{c}");
    assert_eq!(c["iommu"], false, "{c}");
    assert_ne!(b["id"], a["id"]);
    let run = vmm.wait(DEADLINE);
    // The device outside the vIOMMU cannot fault: its three fault cases are skipped, and
    // only those.
    let suites = check_suites_skipping(
        "linux_hotplug",
        &run,
        &["vmm_dmatest"],
        &[
            "fault_read_only",
            "fault_unmapped",
            "fault_already_unmapped",
        ],
    );
    assert_eq!(
        suites
            .iter()
            .filter(|s| s.as_str() == "vmm_dmatest")
            .count(),
        3,
        "one suite per hot-added device: {suites:?}"
    );
    // The dirty log holds exactly the pages the three devices wrote, the removed one's
    // included: each was tracked from its arrival (its own reports, not every writable page),
    // and what the first wrote before it went reached the log.
    let written = guest_written_pages(&run);
    assert!(written.len() > 100, "the suites wrote pages");
    assert_same_pages(
        "dirty log against the pages the suites had the devices write",
        &written,
        &dirty_log_pages(&dirty_log),
    );
    let _ = std::fs::remove_file(&dirty_log);
    assert_eq!(counter(&run, "dirty log", "untracked"), 0);
    for (bdf, n) in [("0000:00:1e.0", 2), ("0000:00:1f.0", 1)] {
        let passed = run.console.matches(&format!("({bdf}, 0 failed)")).count();
        assert_eq!(passed, n, "passing suites on {bdf}");
    }
    eprintln!(
        "hot-plug latency: behind the vIOMMU enabled by the guest after {} ms, ejected after {} \
         ms, enabled again after {} ms; outside the vIOMMU enabled after {} ms (all 256 MiB of \
         RAM mapped on it first)",
        a["enabled_ms"], r["ejected_ms"], b["enabled_ms"], c["enabled_ms"]
    );
}

/// Every request that must fail fails with its error and leaves the VM as it was; a guest
/// that never ejects has its devices torn down at the deadline, their host mappings gone
/// and their connections closed; a device whose server died goes too.
#[test]
fn linux_hotplug_refusals_and_a_guest_that_never_ejects() {
    let (api, dirty_log) = (scratch("api.sock"), scratch("dirty.log"));
    // acpiphp off: the guest never scans nor ejects the slots; the suite waits (for nothing).
    let mut vmm = start_guest(&api, &dirty_log, "acpiphp.disable=1 vmm_dmatest.hotplug=1");
    vmm.wait_console("waiting for hot-plugged device 1 of 1", DEADLINE);
    let error = |v: &serde_json::Value| {
        assert_eq!(v["ok"], false, "{v}");
        v["error"].as_str().unwrap().to_string()
    };

    // A socket nobody serves: refused, naming it, and the slot stays free.
    let gone = scratch("nobody.sock");
    let req = serde_json::json!({"cmd": "add-device", "vfio-user": format!("socket={}", gone.display()), "wait": 1});
    let e = error(&vmm.api(&api, &req.to_string()));
    assert!(e.contains(&gone.display().to_string()), "{e}");
    // A host VFIO device: this host has none (or not that one), and says so.
    let e = error(&vmm.api(
        &api,
        r#"{"cmd":"add-device","vfio":"path=/sys/bus/pci/devices/0000:ff:1f.7,iommu=on","wait":1}"#,
    ));
    assert!(e.contains("0000:ff:1f.7"), "{e}");
    let e = error(&vmm.api(
        &api,
        r#"{"cmd":"add-device","vfio":"path=/x","vfio-user":"socket=/y"}"#,
    ));
    assert!(e.contains("one of `vfio-user` and `vfio`"), "{e}");
    // A bad option names itself.
    let e = error(&vmm.api(
        &api,
        r#"{"cmd":"add-device","vfio-user":"socket=/x,dma=sideways"}"#,
    ));
    assert!(e.contains("dma=sideways"), "{e}");

    // The guest does not take the device: it is on the bus all the same.
    let mut dev1 = DeviceProcess::start();
    let a = try_add(&mut vmm, &api, &dev1, true, 2);
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["added"]["enabled"], false, "{a}");
    assert_eq!(a["added"]["bdf"], "00:1e.0", "{a}");
    // The only slot behind the vIOMMU is taken.
    let dev2 = DeviceProcess::start();
    let e = error(&try_add(&mut vmm, &api, &dev2, true, 1));
    assert!(e.contains("no free hot-plug slot behind the vIOMMU"), "{e}");
    // Outside it: all RAM mapped on the device.
    let mut dev3 = DeviceProcess::start();
    let c = try_add(&mut vmm, &api, &dev3, false, 1);
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["added"]["bdf"], "00:1f.0", "{c}");
    let e = error(&vmm.api(&api, r#"{"cmd":"remove-device","id":"hotplug99","wait":1}"#));
    assert!(e.contains("no hot-added device `hotplug99`"), "{e}");
    let counters = viommu_counters(&mut vmm, &api);
    assert_eq!(field(&counters, "endpoints"), "1", "{counters}");

    // Never ejected: the request fails saying so, and the device is torn down all the same.
    let e = remove_forced(&mut vmm, &api, &a["added"]["id"], 2);
    assert_eq!(field(&e, "mapped_bytes_left"), "0", "{e}");
    assert_connection_closed(&mut dev1);
    let e = remove_forced(&mut vmm, &api, &c["added"]["id"], 2);
    assert_eq!(field(&e, "mapped_bytes_left"), "0", "{e}");
    let maps: u64 = field(&e, "host_maps").parse().unwrap();
    assert!(maps > 0, "{e}");
    assert_eq!(
        field(&e, "host_unmaps"),
        maps.to_string(),
        "every piece of RAM unmapped: {e}"
    );
    assert_connection_closed(&mut dev3);
    let counters = viommu_counters(&mut vmm, &api);
    assert_eq!(field(&counters, "endpoints"), "0", "{counters}");
    // The slot is free again.
    let dev4 = DeviceProcess::start();
    let d = try_add(&mut vmm, &api, &dev4, true, 1);
    assert_eq!(d["ok"], true, "{d}");
    assert_eq!(d["added"]["bdf"], "00:1e.0", "{d}");
    // Its server dies: the device goes all the same, and the VM runs on.
    let mut dev4 = dev4;
    dev4.child.kill().unwrap();
    dev4.child.wait().unwrap();
    remove_forced(&mut vmm, &api, &d["added"]["id"], 1);
    let st = vmm.api(&api, r#"{"cmd":"status"}"#);
    assert_eq!(st["state"], "running", "{st}");
    let counters = viommu_counters(&mut vmm, &api);
    assert_eq!(field(&counters, "endpoints"), "0", "{counters}");
    vmm.kill();
    let _ = std::fs::remove_file(&dirty_log);
}

/// A Linux guest using a hot-added device migrates, verify on, to a destination started with
/// the device in its slot (`slot=30`, with its own device process); there the guest ejects
/// it, takes a new one in the same slot, and passes the suite on it.
#[test]
fn linux_hotplug_then_migrate_then_unplug_on_the_destination() {
    let (api, dst_api, mig) = (
        scratch("api.sock"),
        scratch("api.sock"),
        scratch("mig.sock"),
    );
    let to = format!("unix:{}", mig.display());
    let mut src = start_guest(&api, Path::new(""), "vmm_dmatest.hotplug=2");
    src.wait_console("waiting for hot-plugged device 1 of 2", DEADLINE);
    let dev1 = DeviceProcess::start();
    let a = add(&mut src, &api, &dev1, true);
    src.wait_console("hot-plugged device 1 of 2 done", DEADLINE);

    let dev1b = DeviceProcess::start();
    let mut dst = VmmProcess::start(&[
        "--memory",
        "256M",
        "--iommu",
        "--hotplug",
        "iommu=1,direct=1",
        "--vfio-user",
        &format!("{},slot=30", dev1b.arg(true)),
        "--api-socket",
        dst_api.to_str().unwrap(),
        "--counters",
        "--incoming",
        &to,
    ]);
    vmm_tests::migration::wait_for_path(&mig);
    let report = vmm_tests::migration::migrate(&api, &to, r#","verify":true"#);
    vmm_tests::migration::assert_migrated(&report, 65536);
    vmm_tests::migration::assert_handed_over(&src.wait(DEADLINE));

    // On the destination: the guest ejects the migrated device, then takes a new one.
    let r = remove(&mut dst, &dst_api, &serde_json::json!("hotplug0"), 300);
    assert_eq!(
        r["ejected"], true,
        "the guest did not eject it on the destination: {r}"
    );
    assert_eq!(r["bdf"], a["bdf"], "{r}");
    assert_eq!(r["mapped_bytes_left"], 0, "{r}");
    let dev2 = DeviceProcess::start();
    let b = add(&mut dst, &dst_api, &dev2, true);
    assert_eq!(b["bdf"], "00:1e.0", "{b}");
    let run = dst.wait(DEADLINE);
    check_suites_skipping("linux_hotplug after migration", &run, &["vmm_dmatest"], &[]);
    assert!(
        run.console
            .contains("hot-plugged device 2 of 2 done (0000:00:1e.0, 0 failed)"),
        "{}",
        run.console
    );
}
