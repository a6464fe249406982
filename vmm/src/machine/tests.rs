//! The machine's own operations: what a harvest reports, the migration status, the
//! configuration as it stands. A real KVM VM with no kernel (`--incoming defer`), its vCPU
//! run on a few instructions.

use super::*;
use crate::cli::Cli;
use boot::layout::PDPTE_START;
use clap::Parser;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

/// Where RAM continues above the PCI hole.
const HIGH: u64 = 1 << 32;

/// Where the vCPU program lives; the page directory that maps the 2 MiB from [`HIGH`].
const PROGRAM: u64 = 0x20_0000;
const HIGH_PD: u64 = 0x30_0000;

/// Writes one byte to each of 0x400000, 0x401000 and 4 GiB, then `out 0x80, al`.
const WRITES: [u8; 31] = [
    0xc6, 0x04, 0x25, 0x00, 0x00, 0x40, 0x00, 0x01, // mov byte [0x400000], 1
    0xc6, 0x04, 0x25, 0x00, 0x10, 0x40, 0x00, 0x01, // mov byte [0x401000], 1
    0x48, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // mov rax, 1 << 32
    0xc6, 0x00, 0x01, // mov byte [rax], 1
    0xe6, 0x80, // out 0x80, al
];

/// A VM of `memory` (a `--memory` value) with one vCPU and the devices `flags` add, built as
/// `vmm` builds it but with no kernel, nothing running.
pub(crate) fn machine_with(memory: &str, flags: &[&str]) -> (Arc<Machine>, Vec<VcpuFd>) {
    let mut args = vec![
        "vmm",
        "--incoming",
        "defer",
        "--memory",
        memory,
        "--serial",
        "off",
        "--cpus",
        "1",
    ];
    args.extend_from_slice(flags);
    let cli = Cli::try_parse_from(args).unwrap();
    crate::run::assemble(crate::build::Vm::new(&cli.into_config()).unwrap())
}

/// [`machine_with`] no devices.
pub(crate) fn machine(memory: &str) -> (Arc<Machine>, Vec<VcpuFd>) {
    machine_with(memory, &[])
}

/// Puts `vcpu` in 64-bit mode at [`PROGRAM`] running [`WRITES`], with the 2 MiB at 4 GiB
/// mapped too (the boot tables map the first 4 GiB).
fn load_writes(m: &Machine, vcpu: &VcpuFd) {
    let mem = m.ram.mem.as_ref();
    boot::cpu::setup_boot_vcpu(mem, vcpu, GuestAddress(PROGRAM)).unwrap();
    mem.write_obj(HIGH_PD | 0x3, GuestAddress(PDPTE_START + 4 * 8))
        .unwrap();
    mem.write_obj(HIGH | 0x83, GuestAddress(HIGH_PD)).unwrap();
    mem.write_slice(&WRITES, GuestAddress(PROGRAM)).unwrap();
}

/// Runs [`WRITES`] from its start to its `out`.
fn run_writes(vcpu: &mut VcpuFd) {
    assert_eq!(run_at(vcpu, PROGRAM), Vec::<u64>::new());
}

/// Runs the code at `rip` to its `out 0x80`; returns the GPAs of the MMIO writes that
/// came to the VMM on the way.
fn run_at(vcpu: &mut VcpuFd, rip: u64) -> Vec<u64> {
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = rip;
    vcpu.set_regs(&regs).unwrap();
    let mut mmio = Vec::new();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0x80, _)) => return mmio,
            Ok(VcpuExit::MmioWrite(gpa, _)) => mmio.push(gpa),
            Ok(e) => panic!("unexpected exit {e:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
}

/// An MMIO address in the PCI hole, and code that writes a byte there, then `out 0x80, al`.
const DOORBELL: u64 = 0xd000_0000;
const WRITE_DOORBELL: [u8; 15] = [
    0x48, 0xb8, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, // mov rax, DOORBELL
    0xc6, 0x00, 0x01, // mov byte [rax], 1
    0xe6, 0x80, // out 0x80, al
];

/// A queue's ioeventfd, registered, takes the guest's doorbell write inside KVM (the VMM
/// sees no exit, the eventfd counts it); unregistered, the write comes to the VMM again.
#[test]
fn ioeventfds_take_doorbell_writes_until_unregistered() {
    use ::devices::virtio::pci::IoEventRegistrar;
    let (m, mut vcpus) = machine("64M");
    load_writes(&m, &vcpus[0]);
    let at = PROGRAM + 0x100;
    m.ram
        .mem
        .as_ref()
        .write_slice(&WRITE_DOORBELL, GuestAddress(at))
        .unwrap();
    let evt = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let events = devices::KvmIoEvents(m.vm_fd.clone());
    assert_eq!(run_at(&mut vcpus[0], at), vec![DOORBELL]);
    events.register(&evt, DOORBELL).unwrap();
    assert_eq!(run_at(&mut vcpus[0], at), Vec::<u64>::new());
    assert_eq!(run_at(&mut vcpus[0], at), Vec::<u64>::new());
    assert_eq!(evt.read().unwrap(), 2);
    events.unregister(&evt, DOORBELL).unwrap();
    assert_eq!(run_at(&mut vcpus[0], at), vec![DOORBELL]);
    assert!(
        evt.read().is_err(),
        "no write signalled after unregistering"
    );
    // Twice is an error KVM reports.
    assert!(events.unregister(&evt, DOORBELL).is_err());
}

/// Device memory gets the slots from [`devices::DEVICE_SLOT_BASE`] up, a slot given back is
/// used again, and a mapping KVM refuses (over RAM) gives its slot back.
#[test]
fn device_memory_slots_are_handed_out_and_given_back() {
    use ::devices::passthrough::pci::GuestMapper;
    let (m, _) = machine("64M");
    let len = 0x10_000usize;
    // SAFETY: a fresh anonymous mapping, unmapped at the end of the test after its slots.
    let hva = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as u64;
    let mapper = devices::KvmGuestMapper::new(m.vm_fd.clone());
    let base = devices::DEVICE_SLOT_BASE;
    let a = mapper.map(DOORBELL, len as u64, hva).unwrap();
    let b = mapper.map(DOORBELL + 0x10_0000, len as u64, hva).unwrap();
    assert_eq!((a, b), (base, base + 1));
    // Over RAM: refused, and the slot it would have had is the next one's.
    assert!(mapper.map(0x10_0000, len as u64, hva).is_err());
    mapper.unmap(a);
    assert_eq!(
        mapper.map(DOORBELL + 0x20_0000, len as u64, hva).unwrap(),
        a
    );
    assert_eq!(
        mapper.map(DOORBELL + 0x30_0000, len as u64, hva).unwrap(),
        base + 2
    );
    for s in [a, b, base + 2] {
        mapper.unmap(s);
    }
    // SAFETY: no slot maps it any more.
    unsafe { libc::munmap(hva as *mut libc::c_void, len) };
}

/// A harvest reports every page written since tracking started, by writer, in both RAM
/// regions (below the PCI hole and above 4 GiB), each once: vCPU writes from KVM's log, the
/// VMM's own writes from vm-memory's bitmap. Writes before tracking started and pages
/// already harvested are not reported. Stopping turns KVM's log off.
#[test]
fn a_harvest_names_each_writers_pages_once_in_both_ram_regions() {
    let (m, mut vcpus) = machine("3328M");
    assert_eq!(m.ram.regions().len(), 2, "RAM split by the PCI hole");
    let mem = m.ram.mem.as_ref();
    load_writes(&m, &vcpus[0]);
    // Once before tracking: the page tables' accessed and dirty bits are set by then.
    run_writes(&mut vcpus[0]);
    mem.write_obj(1u8, GuestAddress(0x80_0000)).unwrap();

    assert_eq!(m.start_tracking(true).unwrap(), Vec::<String>::new());
    run_writes(&mut vcpus[0]);
    mem.write_obj(1u8, GuestAddress(0x80_2000)).unwrap();
    mem.write_obj(1u8, GuestAddress(HIGH + 0x5000)).unwrap();
    let mut out = DirtyBitmap::new(&m.devices.ram_ranges);
    let n = m.harvest(&mut out).unwrap();
    assert_eq!(
        out.runs(),
        vec![
            (0x40_0000, 0x2000),
            (0x80_2000, 0x1000),
            (HIGH, 0x1000),
            (HIGH + 0x5000, 0x1000)
        ]
    );
    assert_eq!(
        n,
        DirtySources {
            kvm: 3,
            vmm_devices: 2,
            passthrough: 0,
            vhost_user: 0
        }
    );

    let mut again = DirtyBitmap::new(&m.devices.ram_ranges);
    assert_eq!(m.harvest(&mut again).unwrap(), DirtySources::default());
    assert!(again.is_clean(), "{:x?}", again.runs());

    m.stop_tracking();
    let e = m.harvest(&mut again).unwrap_err().to_string();
    assert!(e.contains("KVM_GET_DIRTY_LOG of slot 0"), "{e}");
}

/// The configuration as it stands follows the PCI functions (hot-plug adds and removes
/// some), and is otherwise the one the VM was built with.
#[test]
fn the_current_config_lists_the_functions_as_they_are() {
    let (m, _) = machine("64M");
    assert_eq!(m.current_config(), m.config);
    let gone = m.devices.functions.write_locked().pop().unwrap();
    let now = m.current_config();
    assert_eq!(now.functions.len() + 1, m.config.functions.len());
    assert!(!now.functions.contains(&(gone.slot, gone.kind)));
    assert_eq!((now.memory, now.cpus), (m.config.memory, m.config.cpus));
}

/// The counters name every device, and with `--track-dirty` the dirty log since boot
/// (written by `--dirty-log-out` at the end); without it there is no log to write.
#[test]
fn counters_and_the_dirty_log_name_every_device() {
    let dir = std::env::temp_dir().join(format!("vmm-machine-counters-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_flag = format!("path={},iommu=on", disk.display());
    let flags = ["--iommu", "--disk", &disk_flag];
    let (m, _) = machine_with("64M", &flags);
    let lines = m.devices.counters_report();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("virtio-iommu 00:01.0: "), "{lines:?}");
    let blk = format!(
        "virtio-blk 00:02.0 ({}, behind the vIOMMU): ",
        disk.display()
    );
    assert!(lines[1].starts_with(&blk), "{lines:?}");
    let log = dir.join("log");
    assert!(m.devices.write_dirty_log(&log).is_err());
    assert!(!log.exists());

    let tracked: Vec<&str> = flags.iter().copied().chain(["--track-dirty"]).collect();
    let (m, _) = machine_with("64M", &tracked);
    let lines = m.devices.counters_report();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[2].starts_with("dirty log: pages=0 bytes=0 untracked=0 "),
        "{lines:?}"
    );
    m.devices.write_dirty_log(&log).unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "pages=0\n");
    // Tracking stopped (a migration's end): no log any more.
    m.stop_tracking();
    assert_eq!(m.devices.counters_report().len(), 2);
    assert!(m.devices.write_dirty_log(&log).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The hashes verify compares are those of every page of RAM, holes included (as the zero
/// page); a byte written changes its page's hash only.
#[test]
fn ram_hashes_cover_every_page() {
    let (m, _) = machine("64M");
    let mem = m.ram.mem.as_ref();
    mem.write_obj(7u8, GuestAddress(0x30_3000)).unwrap();
    let ours = crate::migration::ram_hashes(&m).unwrap();
    let all = crate::migration::page_hashes(mem, &m.devices.ram_ranges, None).unwrap();
    assert_eq!(ours.len() as u64, m.config.memory / 4096);
    assert_eq!(ours, all);
    mem.write_obj(8u8, GuestAddress(0x30_3000)).unwrap();
    let changed = crate::migration::ram_hashes(&m).unwrap();
    assert_eq!(
        crate::migration::differing_pages(&ours, &changed, &m.devices.ram_ranges),
        vec![0x30_3000]
    );
}

/// A hot-plug request the slots cannot take is refused by name before anything is
/// connected: without `--hotplug`, `iommu=on` without `--iommu`, a slot of the other kind,
/// during a snapshot or migration, an unknown id to remove. A device that cannot be
/// connected fails and leaves its slot free.
#[test]
fn hot_plug_requests_the_slots_cannot_take_are_refused() {
    use hotplug::HotDevice;
    let wait = Duration::from_millis(10);
    let dev = |opts: &str| {
        HotDevice::VfioUser(
            crate::config::parse_vfio_user(&format!("socket=/nonexistent/vfio-user{opts}"))
                .unwrap(),
        )
    };
    let busy = |r: Result<hotplug::AddedDevice, MachineError>| match r {
        Err(MachineError::Busy(m)) => m,
        Err(e) => panic!("not refused: {e}"),
        Ok(_) => panic!("added"),
    };
    let failed = |r: Result<hotplug::AddedDevice, MachineError>| match r {
        Err(MachineError::State(m)) => m,
        Err(e) => panic!("not a failure: {e}"),
        Ok(_) => panic!("added"),
    };

    let (m, _) = machine("64M");
    let e = busy(m.add_device(&dev(""), wait));
    assert!(e.contains("--hotplug"), "{e}");

    let (m, _) = machine_with("64M", &["--hotplug", "direct=1"]);
    let e = busy(m.add_device(&dev(",iommu=on"), wait));
    assert!(e.contains("iommu=on needs --iommu"), "{e}");

    let (m, _) = machine_with("64M", &["--iommu", "--hotplug", "iommu=1,direct=1"]);
    let slots = &m.hotplug.as_ref().unwrap().slots;
    let direct = slots.iter().find(|s| !s.behind).unwrap().slot;
    let behind = slots.iter().find(|s| s.behind).unwrap().slot;
    let e = busy(m.add_device(&dev(&format!(",iommu=on,slot={direct}")), wait));
    assert!(
        e.contains("not a free hot-plug slot behind the vIOMMU"),
        "{e}"
    );
    let e = busy(m.add_device(&dev(&format!(",slot={behind}")), wait));
    assert!(
        e.contains("not a free hot-plug slot outside the vIOMMU"),
        "{e}"
    );
    {
        let _snapshot = m.busy.lock().unwrap();
        let e = busy(m.add_device(&dev(",iommu=on"), wait));
        assert!(e.contains("add-device is refused"), "{e}");
    }
    let functions = m.current_config().functions;
    for opts in [",iommu=on", "", &format!(",iommu=on,slot={behind}")] {
        let e = failed(m.add_device(&dev(opts), wait));
        assert!(e.contains("/nonexistent/vfio-user"), "{e}");
        assert_eq!(m.current_config().functions, functions);
    }
    match m.remove_device("hotplug0", wait) {
        Err(MachineError::Busy(e)) => {
            assert!(
                e.contains("no hot-added device `hotplug0` (present: none)"),
                "{e}"
            )
        }
        r => panic!("{:?}", r.map(|_| ())),
    }
}

/// Where [`COUNT`] counts, and code that counts there for ever.
const COUNTER: u64 = 0x50_0000;
const COUNT: [u8; 10] = [
    0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x50, 0x00, // inc qword [0x500000]
    0xeb, 0xf6, // jmp back to the inc
];

/// Waits (up to 10 s) until `f` holds; fails naming `what`.
pub(crate) fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 10 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Starts the machine's vCPU on a thread of its own, running [`COUNT`]: the counter at
/// [`COUNTER`] goes up while the guest runs. [`stop_vcpus`] ends the thread.
pub(crate) fn start_counting(m: &Machine, mut vcpus: Vec<VcpuFd>) {
    vcpu::install_kick_handler().unwrap();
    load_writes(m, &vcpus[0]);
    let at = PROGRAM + 0x200;
    m.ram.mem.write_slice(&COUNT, GuestAddress(at)).unwrap();
    let mut regs = vcpus[0].get_regs().unwrap();
    regs.rip = at;
    vcpus[0].set_regs(&regs).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = vcpu::spawn(0, vcpus.remove(0), m.ctx.clone(), rx).unwrap();
    m.threads.locked().push(t);
    m.requests.locked().push(tx);
}

/// Where [`start_counting`]'s guest code lies.
pub(crate) const COUNTING_CODE: std::ops::Range<u64> =
    PROGRAM + 0x200..PROGRAM + 0x200 + COUNT.len() as u64;

/// The count of [`start_counting`]'s guest.
pub(crate) fn counter(m: &Machine) -> u64 {
    m.ram.mem.read_obj::<u64>(GuestAddress(COUNTER)).unwrap()
}

/// Ends the machine's vCPU threads (kicking them out of `KVM_RUN`).
pub(crate) fn stop_vcpus(m: &Machine) {
    m.ctx.stop.store(true, Ordering::Release);
    for t in std::mem::take(&mut *m.threads.locked()) {
        while !t.is_finished() {
            let _ = vmm_sys_util::signal::Killable::kill(&t, vcpu::kick_signal());
            std::thread::sleep(Duration::from_millis(1));
        }
        t.join().unwrap();
    }
}

/// Paused vCPUs stop running guest code and save their state (in the code they ran);
/// resumed, they run on. The guest counts in memory, and the test reads the count.
#[test]
fn paused_vcpus_save_their_state_and_run_again() {
    let (m, vcpus) = machine("64M");
    start_counting(&m, vcpus);
    wait_for("the guest counting", || counter(&m) > 0);

    m.pause_vcpus().unwrap();
    let paused = counter(&m);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(counter(&m), paused, "a paused guest counted on");
    let st = m.save_vcpus().unwrap();
    assert_eq!(st.len(), 1);
    let rip = st[0].regs.rip;
    assert!(COUNTING_CODE.contains(&rip), "rip {rip:#x}");

    m.resume_vcpus();
    wait_for("the guest counting again", || counter(&m) > paused);
    stop_vcpus(&m);
}

/// A vCPU's MSRs (from the list KVM can save) and the VM's clock come back on another VM's
/// vCPU after a save and a restore.
#[test]
fn msrs_and_the_clock_survive_a_save_and_a_restore() {
    use kvm_bindings::{kvm_clock_data, kvm_msr_entry, Msrs};
    use kvm_state::{VcpuState, VmState};
    const SYSENTER_CS: u32 = 0x174;
    const SYSENTER_ESP: u32 = 0x175;
    let (a, va) = machine("64M");
    assert!(
        a.ctx.msr_indices.contains(&SYSENTER_ESP),
        "KVM saves SYSENTER_ESP"
    );
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let set =
        Msrs::from_entries(&[entry(SYSENTER_CS, 0x10), entry(SYSENTER_ESP, 0x1234_5678)]).unwrap();
    assert_eq!(va[0].set_msrs(&set).unwrap(), 2);
    a.vm_fd
        .set_clock(&kvm_clock_data {
            clock: 1 << 40,
            ..Default::default()
        })
        .unwrap();
    let vcpu = VcpuState::save(&va[0], &a.ctx.msr_indices, a.ctx.xsave_size).unwrap();
    let vm = VmState::save(&a.vm_fd).unwrap();

    let (b, vb) = machine("64M");
    vm.restore(&b.vm_fd).unwrap();
    vcpu.restore(&vb[0], b.ctx.xsave_size).unwrap();
    let mut back = Msrs::from_entries(&[entry(SYSENTER_CS, 0), entry(SYSENTER_ESP, 0)]).unwrap();
    assert_eq!(vb[0].get_msrs(&mut back).unwrap(), 2);
    let got: Vec<(u32, u64)> = back.as_slice().iter().map(|e| (e.index, e.data)).collect();
    assert_eq!(got, vec![(SYSENTER_CS, 0x10), (SYSENTER_ESP, 0x1234_5678)]);
    assert!(b.vm_fd.get_clock().unwrap().clock >= 1 << 40);

    // An MSR this host's KVM refuses is named, and the ones after it are still loaded.
    let (c, vc) = machine("64M");
    let mut odd = vcpu.clone();
    odd.msrs.insert(0, (0xdead_beef, 1));
    match odd.restore(&vc[0], c.ctx.xsave_size) {
        Err(kvm_state::KvmStateError::MsrsRefused(m)) => assert_eq!(m, vec![0xdead_beef]),
        r => panic!("{r:?}"),
    }
    let mut back = Msrs::from_entries(&[entry(SYSENTER_ESP, 0)]).unwrap();
    vc[0].get_msrs(&mut back).unwrap();
    assert_eq!(back.as_slice()[0].data, 0x1234_5678);
}

/// A TSC deadline armed by the guest (its local APIC timer in TSC-deadline mode) is armed
/// again on the destination: KVM ignores a deadline written before the APIC is in that mode,
/// so a restore must load it after the APIC.
#[test]
fn a_tsc_deadline_survives_a_restore() {
    use kvm_bindings::{kvm_msr_entry, Msrs};
    use kvm_state::VcpuState;
    const TSC: u32 = 0x10;
    const TSC_DEADLINE: u32 = 0x6e0;
    let (a, va) = machine("64M");
    if !a.ctx.msr_indices.contains(&TSC_DEADLINE) {
        eprintln!("SKIP: a_tsc_deadline_survives_a_restore: KVM saves no TSC deadline here");
        return;
    }
    let msr = |vcpu: &VcpuFd, index| {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut m).unwrap(), 1);
        m.as_slice()[0].data
    };
    // The LVT timer register (0x320): TSC-deadline mode (bits 17-18 = 2), vector 0xec.
    let mut lapic = va[0].get_lapic().unwrap();
    let lvtt = ((2u32 << 17) | 0xec).to_le_bytes();
    for (i, b) in lvtt.iter().enumerate() {
        lapic.regs[0x320 + i] = *b as _;
    }
    va[0].set_lapic(&lapic).unwrap();
    // An hour or so ahead at any clock rate this host has.
    let deadline = msr(&va[0], TSC) + 10_000_000_000_000;
    let set = Msrs::from_entries(&[kvm_msr_entry {
        index: TSC_DEADLINE,
        data: deadline,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(va[0].set_msrs(&set).unwrap(), 1);
    assert_eq!(msr(&va[0], TSC_DEADLINE), deadline, "armed on the source");
    let st = VcpuState::save(&va[0], &a.ctx.msr_indices, a.ctx.xsave_size).unwrap();
    let (b, vb) = machine("64M");
    st.restore(&vb[0], b.ctx.xsave_size).unwrap();
    assert_eq!(
        msr(&vb[0], TSC_DEADLINE),
        deadline,
        "armed on the destination"
    );
}

/// Runs `code` (ending in a loop of its own) on the machine's vCPU thread until `done` holds
/// or the VM ends; returns the thread's fallback statistics and why the VM ended, if it did.
fn run_on_thread(
    m: &Machine,
    mut vcpus: Vec<VcpuFd>,
    code: &[u8],
    done: impl Fn() -> bool,
) -> (FallbackStats, Option<::devices::exit::ExitReason>) {
    vcpu::install_kick_handler().unwrap();
    load_writes(m, &vcpus[0]);
    let at = PROGRAM + 0x300;
    m.ram.mem.write_slice(code, GuestAddress(at)).unwrap();
    let mut regs = vcpus[0].get_regs().unwrap();
    regs.rip = at;
    vcpus[0].set_regs(&regs).unwrap();
    let (_tx, rx) = std::sync::mpsc::channel();
    let t = vcpu::spawn(0, vcpus.remove(0), m.ctx.clone(), rx).unwrap();
    wait_for("the guest's end or its work done", || {
        m.exit.reason().is_some() || done()
    });
    m.ctx.stop.store(true, Ordering::Release);
    while !t.is_finished() {
        let _ = vmm_sys_util::signal::Killable::kill(&t, vcpu::kick_signal());
        std::thread::sleep(Duration::from_millis(1));
    }
    (t.join().unwrap(), m.exit.reason())
}

/// Two `fwait`s, then a byte written at 0x400000 (the sign of having got past them), then
/// a loop.
const FWAITS: [u8; 12] = [
    0x9b, 0x9b, // fwait; fwait
    0xc6, 0x04, 0x25, 0x00, 0x00, 0x40, 0x00, 0x01, // mov byte [0x400000], 1
    0xeb, 0xfe, // jmp $
];

/// An instruction KVM's emulator refuses (`fwait`, on this PVM host) is done by the VMM's
/// fallback and counted once per execution when host quirks are on; with them off the VM
/// ends, naming the instruction.
#[test]
fn instructions_kvm_cannot_emulate_take_the_fallback_only_with_quirks_on() {
    if !matches!(
        boot::quirks::HostQuirks::detect(),
        boot::quirks::HostQuirks::Pvm
    ) {
        eprintln!("SKIP: not a PVM host: KVM runs fwait itself");
        return;
    }
    let (m, vcpus) = machine_with("64M", &["--host-quirks", "pvm"]);
    let mem = m.ram.mem.clone();
    let passed = move || mem.read_obj::<u8>(GuestAddress(0x40_0000)).unwrap() == 1;
    let (stats, reason) = run_on_thread(&m, vcpus, &FWAITS, passed.clone());
    assert_eq!(reason, None);
    assert!(passed());
    assert_eq!(
        stats.counts.into_iter().collect::<Vec<_>>(),
        vec![(boot::quirks::Fallback::Fwait, 2)]
    );

    let (m, vcpus) = machine_with("64M", &["--host-quirks", "none"]);
    let (stats, reason) = run_on_thread(&m, vcpus, &FWAITS, || false);
    match reason {
        Some(::devices::exit::ExitReason::Error(e)) => {
            assert!(
                e.contains("cannot emulate") && e.contains("(host quirks are off)"),
                "{e}"
            )
        }
        r => panic!("{r:?}"),
    }
    assert!(stats.counts.is_empty());
}

/// The DMA test device served in this process on a fresh socket (as `--vfio-user` names
/// it), until the VMM side hangs up.
fn test_device(how: testdev::Behaviour) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("vmm-machine-dev-{}-{n}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let p = path.clone();
    std::thread::spawn(move || {
        let _ = testdev::serve(&p, how);
    });
    wait_for("the test device's socket", || path.exists());
    path
}

/// The machine's event loop on a thread of its own (hot-plug calls into it), until the
/// returned flag is set.
fn event_loop(m: &Arc<Machine>) -> Arc<std::sync::atomic::AtomicBool> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (m, s) = (m.clone(), stop.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut em = event_manager::EventManager::<devices::Subscriber>::new().unwrap();
        if let Some(h) = &m.hotplug {
            h.start(&mut em);
        }
        for sub in &m.devices.subscribers {
            event_manager::SubscriberOps::add_subscriber(&mut em, sub.clone());
        }
        tx.send(()).unwrap();
        while !s.load(Ordering::Acquire) {
            let _ = em.run_with_timeout(20);
        }
    });
    rx.recv().unwrap();
    stop
}

/// A vfio-user device behind the vIOMMU: it can migrate (one that offers no migration is
/// refused by name), takes the migration states asked (an unknown one is refused, naming
/// it), is tracked (nothing written, nothing dirty), and has its counters line.
#[test]
fn a_passthrough_device_is_checked_moved_tracked_and_counted() {
    let sock = test_device(Default::default());
    let flag = format!("socket={},iommu=on", sock.display());
    let (m, _) = machine_with("64M", &["--iommu", "--vfio-user", &flag]);
    m.check_migratable().unwrap();
    assert_eq!(m.start_tracking(true).unwrap(), Vec::<String>::new());
    let mut out = DirtyBitmap::new(&m.devices.ram_ranges);
    m.harvest(&mut out).unwrap();
    assert!(out.is_clean(), "{:x?}", out.runs());
    m.stop_tracking();
    m.passthrough_state(device_state::STOP).unwrap();
    m.passthrough_state(device_state::RUNNING).unwrap();
    let e = m.passthrough_state(0x99).unwrap_err().to_string();
    assert!(e.contains(&sock.display().to_string()), "{e}");
    let lines = m.devices.counters_report();
    let line = lines
        .iter()
        .find(|l| l.contains("vfio-user device"))
        .expect("a line for the device");
    assert!(
        line.contains("dma_map_calls=") && line.contains(" failed=0"),
        "{line}"
    );

    let sock = test_device(testdev::Behaviour {
        no_migration: true,
        ..Default::default()
    });
    let flag = format!("socket={},iommu=on", sock.display());
    let (m, _) = machine_with("64M", &["--iommu", "--vfio-user", &flag]);
    match m.check_migratable() {
        Err(MachineError::Busy(e)) => assert!(e.contains("cannot be migrated"), "{e}"),
        r => panic!("{r:?}"),
    }
}

/// A passthrough device outside the vIOMMU is tracked by its own DMA log; one that cannot
/// log is reported untracked by its label (a migration then copies all of RAM each round).
#[test]
fn a_device_outside_the_viommu_is_tracked_by_its_log_or_reported() {
    for (log, untracked) in [
        (testdev::DirtyLogMode::On, false),
        (testdev::DirtyLogMode::Off, true),
    ] {
        let sock = test_device(testdev::Behaviour {
            dirty_log: log,
            ..Default::default()
        });
        let flag = format!("socket={}", sock.display());
        let (m, _) = machine_with("64M", &["--vfio-user", &flag]);
        let got = m.start_tracking(true).unwrap();
        let label = m.devices.passthrough.read_locked()[0].label.clone();
        let want = if untracked { vec![label] } else { vec![] };
        assert_eq!(got, want, "{log:?}");
        m.stop_tracking();
    }
}

/// A device's DMA to an IOVA the guest never mapped is refused, and its fault report
/// reaches the VMM's event loop and is counted for that device.
#[test]
fn a_passthrough_devices_fault_is_forwarded_and_counted() {
    use testdev::regs;
    let sock = test_device(Default::default());
    let flag = format!("socket={},iommu=on", sock.display());
    let (m, _) = machine_with("64M", &["--iommu", "--vfio-user", &flag]);
    let stop = event_loop(&m);
    let dev = m
        .devices
        .functions
        .read_locked()
        .iter()
        .find(|f| f.kind == DeviceKind::VfioUser)
        .map(|f| f.device.clone())
        .unwrap();
    let write = |reg: u64, v: u64, n: usize| dev.locked().bar_write(0, reg, &v.to_le_bytes()[..n]);
    write(regs::DST, 0x10_0000, 8);
    write(regs::LEN, 4096, 8);
    write(regs::OP, u64::from(testdev::OP_FILL), 4);
    write(regs::DOORBELL, 1, 4);
    let line = || {
        m.devices
            .counters_report()
            .into_iter()
            .find(|l| l.contains("vfio-user device"))
            .unwrap()
    };
    wait_for("the fault counted", || line().contains(" dma_faults=1 "));
    stop.store(true, Ordering::Release);
}

/// A device added while the VM runs takes a free slot behind the vIOMMU and is reported
/// not enabled when no guest driver takes it; its slot is then taken, and its id removes
/// it (without the guest's eject, which is reported) and frees the slot. Without the event
/// loop nothing can be added.
#[test]
fn a_hot_added_device_takes_a_slot_until_removed() {
    let wait = Duration::from_millis(10);
    // Two slots outside the vIOMMU too: the refusal counts only the kind asked for.
    let (m, _) = machine_with("64M", &["--iommu", "--hotplug", "iommu=1,direct=2"]);
    let slots = &m.hotplug.as_ref().unwrap().slots;
    let slot = slots.iter().find(|s| s.behind).unwrap().slot;
    let dev = |sock: &std::path::Path| {
        hotplug::HotDevice::VfioUser(
            crate::config::parse_vfio_user(&format!("socket={},iommu=on", sock.display())).unwrap(),
        )
    };
    let sock = test_device(Default::default());
    match m.add_device(&dev(&sock), wait) {
        Err(MachineError::Busy(e)) => assert!(e.contains("event loop is not running"), "{e}"),
        r => panic!("{:?}", r.map(|_| ())),
    }
    let stop = event_loop(&m);
    let sock = test_device(Default::default());
    let added = m.add_device(&dev(&sock), wait).unwrap();
    assert_eq!(
        (added.id.as_str(), added.bdf, added.iommu, added.enabled),
        ("hotplug0", format!("00:{slot:02x}.0"), true, false)
    );
    assert!(m
        .current_config()
        .functions
        .contains(&(slot, DeviceKind::VfioUser)));
    let other = test_device(Default::default());
    match m.add_device(&dev(&other), wait) {
        Err(MachineError::Busy(e)) => assert_eq!(
            e,
            "no free hot-plug slot behind the vIOMMU: 1 in all, all taken (--hotplug iommu=N)"
        ),
        r => panic!("{:?}", r.map(|_| ())),
    }
    match m.remove_device("hotplug0", wait) {
        Err(MachineError::State(e)) => {
            assert!(e.contains("did not eject hotplug0"), "{e}")
        }
        r => panic!("{:?}", r.map(|_| ())),
    }
    assert!(!m
        .current_config()
        .functions
        .contains(&(slot, DeviceKind::VfioUser)));
    let added = m.add_device(&dev(&other), wait).unwrap();
    assert_eq!(added.id, "hotplug1");
    stop.store(true, Ordering::Release);
}

/// A hot-added device that could not report its writes stops counting as untracked once
/// removed; the other untracked devices still count.
#[test]
fn a_removed_device_leaves_the_untracked_list_alone_but_itself() {
    let wait = Duration::from_millis(10);
    let off = || {
        test_device(testdev::Behaviour {
            dirty_log: testdev::DirtyLogMode::Off,
            ..Default::default()
        })
    };
    let cold = format!("socket={}", off().display());
    let (m, _) = machine_with("64M", &["--vfio-user", &cold, "--hotplug", "direct=1"]);
    let stop = event_loop(&m);
    let hot = crate::config::parse_vfio_user(&format!("socket={}", off().display())).unwrap();
    m.add_device(&hotplug::HotDevice::VfioUser(hot), wait)
        .unwrap();
    let labels: Vec<String> = m
        .devices
        .passthrough
        .read_locked()
        .iter()
        .map(|p| p.label.clone())
        .collect();
    assert_eq!(labels.len(), 2);
    assert_eq!(m.start_tracking(true).unwrap(), labels);
    assert!(
        m.remove_device("hotplug0", wait).is_err(),
        "no guest ejects it"
    );
    assert_eq!(*m.devices.untracked.locked(), labels[..1]);
    m.stop_tracking();
    stop.store(true, Ordering::Release);
}

/// Freezing stops the event loop from serving queues; thawing serves them again.
#[test]
fn freeze_and_thaw_set_the_devices_flag() {
    let (m, _) = machine("64M");
    m.freeze();
    assert!(m.devices.frozen.load(Ordering::Acquire));
    m.thaw();
    assert!(!m.devices.frozen.load(Ordering::Acquire));
}

/// Counts add source by source.
#[test]
fn dirty_sources_add_source_by_source() {
    let mut a = DirtySources {
        kvm: 1,
        vmm_devices: 2,
        passthrough: 3,
        vhost_user: 4,
    };
    a.add(DirtySources {
        kvm: 10,
        vmm_devices: 20,
        passthrough: 30,
        vhost_user: 40,
    });
    assert_eq!(
        a,
        DirtySources {
            kvm: 11,
            vmm_devices: 22,
            passthrough: 33,
            vhost_user: 44
        }
    );
}

/// The phases print as the API names them.
#[test]
fn migration_phases_print_their_api_names() {
    for (p, name) in [
        (MigrationPhase::Copy, "copy"),
        (MigrationPhase::StopAndCopy, "stop-and-copy"),
        (MigrationPhase::HandOver, "hand-over"),
    ] {
        assert_eq!(p.to_string(), name);
        assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{name}\""));
    }
}

/// `status` is `None` while no migration runs (an update then changes nothing), and
/// otherwise the state set, updated, with the pages sent in all rounds and in this one.
#[test]
fn the_progress_shows_the_state_set_and_the_pages_sent() {
    let p = MigrationProgress::default();
    assert_eq!(p.status(), None);
    p.update(|s| s.round = 9);
    assert_eq!(p.status(), None);
    p.set(Some(ProgressState {
        round: 1,
        round_start: 100,
        round_pages: 50,
        ..Default::default()
    }));
    p.pages_sent.store(130, Ordering::Relaxed);
    p.update(|s| s.phase = MigrationPhase::StopAndCopy);
    assert_eq!(
        p.status(),
        Some(MigrationStatus {
            progress: ProgressState {
                phase: MigrationPhase::StopAndCopy,
                round: 1,
                round_start: 100,
                round_pages: 50,
                ..Default::default()
            },
            pages_sent: 130,
            round_sent: 30,
        })
    );
    p.set(None);
    assert_eq!(p.status(), None);
}

/// The stream's machine description names kinds as it always has (a stream written
/// before `DeviceKind` reads the same), and an unknown kind is refused.
#[test]
fn device_kinds_keep_their_stream_names() {
    let c = MachineConfig {
        memory: 1 << 30,
        cpus: 2,
        functions: vec![
            (0, DeviceKind::HostBridge),
            (1, DeviceKind::VirtioIommu),
            (2, DeviceKind::VirtioBlk),
            (3, DeviceKind::VfioUser),
            (4, DeviceKind::Vfio),
            (5, DeviceKind::VhostUserNet),
        ],
    };
    let json = r#"{"memory":1073741824,"cpus":2,"functions":[[0,"host bridge"],[1,"virtio-iommu"],[2,"virtio-blk"],[3,"vfio-user"],[4,"vfio"],[5,"vhost-user-net"]]}"#;
    assert_eq!(serde_json::to_string(&c).unwrap(), json);
    assert_eq!(serde_json::from_str::<MachineConfig>(json).unwrap(), c);
    for (_, k) in &c.functions {
        assert_eq!(serde_json::to_string(k).unwrap(), format!("\"{k}\""));
    }
    assert!(serde_json::from_str::<MachineConfig>(
        r#"{"memory":1,"cpus":1,"functions":[[0,"virtio-gpu"]]}"#
    )
    .is_err());
}
