//! Hot-plug with the project's Linux guest: ACPI PCI hot-plug through the Generic Event
//! Device, Linux's acpiphp, the VIOT naming the hot-plug slots behind the virtio-iommu, and
//! the built-in DMA suite (`vmm_dmatest.hotplug=N`: it waits for N devices added after boot
//! and runs on each).
//!
//! The guest boots with the virtio-iommu and no DMA test device. A device is hot-added
//! behind the vIOMMU through the API; the suite binds to it and passes (fault cases
//! included) with the vIOMMU's counters showing the new endpoint attached; it is
//! hot-removed, the guest ejecting it, with no mapping left for it in the vIOMMU nor on the
//! device server; a second device goes into the same slot and passes again. The verdict is
//! the suite's, through the test-exit port, after the last device.

use std::time::Duration;

use vmm_tests::{check_suites, guest_kernel, scratch, DeviceProcess, VmmProcess};

const DEADLINE: Duration = Duration::from_secs(900);

/// The virtio-iommu's counters line, through the API.
fn viommu_counters(vmm: &mut VmmProcess, api: &std::path::Path) -> String {
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

fn add(
    vmm: &mut VmmProcess,
    api: &std::path::Path,
    dev: &DeviceProcess,
    iommu: bool,
) -> serde_json::Value {
    let req = serde_json::json!({"cmd": "add-device", "vfio-user": dev.arg(iommu), "wait": 300});
    let a = vmm.api(api, &req.to_string());
    assert_eq!(a["ok"], true, "add-device: {a}\n{}", vmm.stderr_so_far());
    assert_eq!(
        a["added"]["enabled"], true,
        "the guest did not enable the device: {a}"
    );
    a["added"].clone()
}

#[test]
fn linux_hotplug_adds_removes_and_adds_again_behind_the_viommu() {
    let g = guest_kernel();
    let api = scratch("api.sock");
    let cmdline = "console=ttyS0 reboot=k panic=1 vmm_dmatest.hotplug=2 \
                   vmm_dmatest.cycles=300 vmm_dmatest.samples=30";
    let mut vmm = VmmProcess::start(&[
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
        cmdline,
    ]);
    vmm.wait_console("waiting for hot-plugged device 1 of 2", DEADLINE);
    let before = viommu_counters(&mut vmm, &api);
    assert_eq!(field(&before, "attached"), "none", "{before}");

    // First device: behind the vIOMMU, in the slot the VIOT names (00:1e.0, endpoint 0xf0).
    let dev1 = DeviceProcess::start();
    let a = add(&mut vmm, &api, &dev1, true);
    assert_eq!(a["bdf"], "00:1e.0", "{a}");
    vmm.wait_console("hot-plugged device 1 of 2 done", DEADLINE);
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

    let id = a["id"].as_str().unwrap().to_string();
    let r = vmm.api(
        &api,
        &format!(r#"{{"cmd":"remove-device","id":"{id}","wait":300}}"#),
    );
    assert_eq!(r["ok"], true, "remove-device: {r}\n{}", vmm.stderr_so_far());
    let r = &r["removed"];
    assert_eq!(r["ejected"], true, "the guest did not eject it: {r}");
    assert_eq!(
        r["mapped_bytes_left"], 0,
        "mappings left on the device server: {r}"
    );
    assert!(r["host_maps"].as_u64().unwrap() > 0, "{r}");
    let after = viommu_counters(&mut vmm, &api);
    assert!(
        !field(&after, "attached").contains("0xf0:"),
        "the removed endpoint is still attached: {after}"
    );
    assert_eq!(field(&after, "endpoints"), "0", "{after}");
    assert_eq!(field(&after, "mapped_pages"), "0", "{after}");
    // The same id is gone.
    let again = vmm.api(
        &api,
        &format!(r#"{{"cmd":"remove-device","id":"{id}","wait":1}}"#),
    );
    assert_eq!(again["ok"], false, "{again}");
    assert!(
        again["error"]
            .as_str()
            .unwrap()
            .contains("no hot-added device"),
        "{again}"
    );

    // A second device in the same slot.
    let dev2 = DeviceProcess::start();
    let b = add(&mut vmm, &api, &dev2, true);
    assert_eq!(b["bdf"], "00:1e.0", "{b}");
    assert_ne!(b["id"], a["id"]);
    let run = vmm.wait(DEADLINE);
    let suites = check_suites("linux_hotplug", &run, &["vmm_dmatest"]);
    assert_eq!(
        suites
            .iter()
            .filter(|s| s.as_str() == "vmm_dmatest")
            .count(),
        2,
        "one suite per hot-added device: {suites:?}"
    );
    eprintln!(
        "hot-plug: first device enabled after {} ms, ejected after {} ms; second enabled after {} ms",
        a["enabled_ms"], r["ejected_ms"], b["enabled_ms"]
    );
}
