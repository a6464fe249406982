use super::*;
use crate::machine::kvm_state::VmState;

fn config() -> MachineConfig {
    MachineConfig {
        memory: 64 << 20,
        cpus: 1,
        functions: vec![
            (0, DeviceKind::HostBridge),
            (1, DeviceKind::VirtioIommu),
            (2, DeviceKind::VfioUser),
        ],
    }
}

/// One vCPU's KVM state, with an XSAVE area of 6,784 bytes (a host with AVX-512's areas).
fn vcpu_state() -> crate::machine::kvm_state::VcpuState {
    crate::machine::kvm_state::VcpuState {
        regs: Default::default(),
        sregs: Default::default(),
        fpu: vec![0x11; std::mem::size_of::<kvm_bindings::kvm_fpu>()],
        lapic: Default::default(),
        msrs: vec![(0x10, 1), (0x6e0, 2)],
        mp_state: Default::default(),
        events: Default::default(),
        xcrs: None,
        xsave: Some((0..4096 + 2688).map(|i| (i % 251) as u8).collect()),
        debugregs: Default::default(),
    }
}

/// A machine state with a virtio-iommu domain and one mapping.
fn state() -> MachineState {
    MachineState {
        version: STATE_VERSION,
        vcpus: vec![vcpu_state()],
        vm: VmState {
            irqchips: Vec::new(),
            pit: Default::default(),
            clock: Default::default(),
        },
        serial: Default::default(),
        functions: Vec::new(),
        viommu: Some(iommu::viommu::ViommuState {
            version: iommu::viommu::STATE_VERSION,
            negotiated: 0,
            bypass: false,
            attached: vec![(0x10, 1)],
            domains: vec![iommu::viommu::DomainState {
                id: 1,
                bypass: false,
                mappings: vec![(0x100, 0x200, 4, 3)],
            }],
            faults: Vec::new(),
        }),
    }
}

/// A small stream as a source writes it: one page, device data, a machine state with a
/// virtio-iommu domain, the end.
pub(crate) fn minimal_stream() -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut w = StreamWriter::new(&mut out).unwrap();
    w.json(Kind::Config, &config()).unwrap();
    w.flush().unwrap();
    let prefix = w.bytes as usize;
    let mut ram = 0x1000u64.to_le_bytes().to_vec();
    ram.extend_from_slice(&[0x5a; 4096]);
    w.record(Kind::Ram, &[&ram]).unwrap();
    w.record(Kind::DeviceData, &[&2u32.to_le_bytes(), b"{}"])
        .unwrap();
    w.json(Kind::State, &state()).unwrap();
    w.record(Kind::End, &[]).unwrap();
    w.flush().unwrap();
    (out, prefix)
}

/// A state record of another version is refused by its version, however the rest of it
/// reads: version 1's untyped device states included.
#[test]
fn an_older_machine_state_is_refused_by_version() {
    let mut stream = Vec::new();
    let mut w = StreamWriter::new(&mut stream).unwrap();
    w.json(Kind::Config, &config()).unwrap();
    w.json(
        Kind::State,
        &serde_json::json!({"version": 1, "serial": null, "functions": [[0, [0, 0]]]}),
    )
    .unwrap();
    w.record(Kind::End, &[]).unwrap();
    let e = read_stream(&stream[..], &config(), &[(0, 64 << 20)], |_, _| Ok(()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("machine state version 1 (this VMM reads 2"),
        "{e}"
    );
}

#[test]
fn a_minimal_stream_reads_and_every_truncation_is_refused() {
    let (stream, _) = minimal_stream();
    let mut written = Vec::new();
    let got = read_stream(&stream[..], &config(), &[(0, 64 << 20)], |gpa, b| {
        written.push((gpa, b.len()));
        Ok(())
    })
    .unwrap();
    assert_eq!(written, vec![(0x1000, 4096)]);
    assert_eq!(got.pages, 1);
    assert_eq!(got.device_data, vec![(2, b"{}".to_vec())]);
    assert!(got.state.viommu.is_some());
    for cut in (0..stream.len()).step_by(97) {
        let r = read_stream(&stream[..cut], &config(), &[(0, 64 << 20)], |_, _| Ok(()));
        assert!(r.is_err(), "cut at {cut}");
    }
    // Pages outside guest RAM are refused.
    let e = read_stream(&stream[..], &config(), &[(0x10_0000, 1 << 20)], |_, _| {
        Ok(())
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("not guest RAM"), "{e}");
}

/// A stream of `records` between the configuration and a valid machine state.
fn stream_with(records: impl FnOnce(&mut StreamWriter<&mut Vec<u8>>)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = StreamWriter::new(&mut out).unwrap();
    w.json(Kind::Config, &config()).unwrap();
    records(&mut w);
    w.json(Kind::State, &state()).unwrap();
    w.record(Kind::End, &[]).unwrap();
    w.flush().unwrap();
    out
}

/// 16 pages of RAM: a budget of 64 passes is 1,024 pages.
const SMALL_RAM: [(u64, u64); 1] = [(0, 16 * 4096)];

fn read(stream: &[u8]) -> Result<Incoming, String> {
    read_stream(stream, &config(), &SMALL_RAM, |_, _| Ok(())).map_err(|e| e.to_string())
}

fn round(w: &mut StreamWriter<&mut Vec<u8>>, n: u32) {
    let r = Round {
        round: n,
        pages: 0,
        ms: 0,
        dirty_after: 0,
        harvest_ms: 0.0,
        dirty_by_source: Default::default(),
    };
    w.json(Kind::Round, &r).unwrap();
}

/// What a source may send is bounded by kind, and each bound is exact: at the bound the
/// stream reads, one past it the record is refused by name.
#[test]
fn a_stream_beyond_its_bounds_is_refused_by_record() {
    let page = |w: &mut StreamWriter<&mut Vec<u8>>| {
        let mut ram = 0u64.to_le_bytes().to_vec();
        ram.extend_from_slice(&[1; 16 * 4096]);
        w.record(Kind::Ram, &[&ram]).unwrap();
    };
    // RAM: 64 passes over all of it, not 65.
    let got = read(&stream_with(|w| (0..MAX_RAM_PASSES).for_each(|_| page(w)))).unwrap();
    assert_eq!(got.pages, 16 * MAX_RAM_PASSES);
    let e = read(&stream_with(|w| (0..=MAX_RAM_PASSES).for_each(|_| page(w))))
        .err()
        .unwrap();
    assert!(
        e.contains("record #65 (Ram)")
            && e.contains("more than 64 passes over the guest's 16 pages of RAM"),
        "{e}"
    );
    // Rounds: round 0 and MAX_ROUNDS more, not one more.
    read(&stream_with(|w| (0..=MAX_ROUNDS).for_each(|n| round(w, n)))).unwrap();
    let e = read(&stream_with(|w| {
        (0..=MAX_ROUNDS + 1).for_each(|n| round(w, n))
    }))
    .err()
    .unwrap();
    assert!(e.contains("more than 62 pre-copy rounds"), "{e}");
    // Device data: once per passthrough function, nowhere else.
    let data = |w: &mut StreamWriter<&mut Vec<u8>>, slot: u32| {
        w.record(Kind::DeviceData, &[&slot.to_le_bytes(), b"{}"])
            .unwrap();
    };
    assert_eq!(
        read(&stream_with(|w| data(w, 2))).unwrap().device_data,
        vec![(2, b"{}".to_vec())]
    );
    for (slot, what) in [
        (1, "slot 1 is not a passthrough device of this VM"),
        (0, "slot 0 is not a passthrough device of this VM"),
        (7, "slot 7 is not a passthrough device of this VM"),
        (300, "slot 300 is not a passthrough device of this VM"),
    ] {
        let e = read(&stream_with(|w| data(w, slot))).err().unwrap();
        assert!(e.contains("(DeviceData)") && e.contains(what), "{e}");
    }
    let e = read(&stream_with(|w| {
        data(w, 2);
        data(w, 2)
    }))
    .err()
    .unwrap();
    assert!(e.contains("a second record for slot 2"), "{e}");
    // One machine state, one hand-over.
    let e = read(&stream_with(|w| w.json(Kind::State, &state()).unwrap()))
        .err()
        .unwrap();
    assert!(e.contains("a second machine state"), "{e}");
    let handover = Handover {
        verify: true,
        timeout_ms: 1,
    };
    read(&stream_with(|w| w.json(Kind::Handover, &handover).unwrap())).unwrap();
    let e = read(&stream_with(|w| {
        w.json(Kind::Handover, &handover).unwrap();
        w.json(Kind::Handover, &handover).unwrap()
    }))
    .err()
    .unwrap();
    assert!(e.contains("a second hand-over record"), "{e}");
    // A hashes record without a hash.
    let e = read(&stream_with(|w| {
        w.record(Kind::Hashes, &[&0u64.to_le_bytes()]).unwrap()
    }))
    .err()
    .unwrap();
    assert!(e.contains("(Hashes)"), "{e}");
}

/// A guest whose RAM, vCPUs or PCI functions differ from this VM's is refused, naming
/// what differs.
#[test]
fn a_guest_of_another_shape_is_refused_by_what_differs() {
    let ours = config();
    assert!(check_config(&ours, &ours).is_ok());
    let refused = |theirs: MachineConfig| match check_config(&theirs, &ours) {
        Err(MigrationError::Incompatible(m)) => m,
        r => panic!("{r:?}"),
    };
    let e = refused(MachineConfig {
        memory: 128 << 20,
        ..config()
    });
    assert!(e.contains("128 MiB of RAM, this VM 64 MiB"), "{e}");
    let e = refused(MachineConfig {
        cpus: 2,
        ..config()
    });
    assert!(e.contains("2 vCPUs, this VM 1"), "{e}");
    let mut theirs = config();
    theirs.functions[2].1 = DeviceKind::Vfio;
    let e = refused(theirs);
    assert!(e.contains("00:02.0 vfio]"), "{e}");
    assert!(e.contains("00:02.0 vfio-user]"), "{e}");
}

/// A restore puts the vCPUs' registers, the serial port and every function back, and
/// refuses, by name, a state of another version, another number of vCPUs, a function
/// this VM lacks, or a virtio-iommu only one side has.
#[test]
fn a_restore_puts_the_state_back_and_refuses_a_state_that_does_not_fit() {
    use crate::machine::kvm_state::VcpuState;
    use crate::machine::tests::machine_with;
    let disk = std::env::temp_dir().join(format!("vmm-restore-disk-{}", std::process::id()));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_flag = format!("path={},iommu=on", disk.display());
    let flags = ["--iommu", "--disk", &disk_flag];
    let (a, va) = machine_with("64M", &flags);
    let mut regs = va[0].get_regs().unwrap();
    (regs.rip, regs.rbx, regs.rflags) = (0x12_3456, 0xfeed, 0x2);
    va[0].set_regs(&regs).unwrap();
    // The guest enabled the disk (memory space and bus master): a state of its own.
    for f in a.devices.functions.read_locked().iter() {
        if f.kind == DeviceKind::VirtioBlk {
            f.device.locked().config_write(1, 0, &[0x6, 0]);
        }
    }
    let st = a
        .state_with(vec![VcpuState::save(
            &va[0],
            &a.ctx.msr_indices,
            a.ctx.xsave_size,
        )
        .unwrap()])
        .unwrap();
    assert_eq!(
        st.functions.len(),
        3,
        "host bridge, virtio-iommu, virtio-blk"
    );

    let (b, vb) = machine_with("64M", &flags);
    let incompatible = |st: &MachineState, vcpus: &[VcpuFd]| match restore(&b, vcpus, st, &[]) {
        Err(MigrationError::Incompatible(m)) => m,
        r => panic!("{r:?}"),
    };
    let mut other = a.state_with(Vec::new()).unwrap();
    other.version = STATE_VERSION + 1;
    assert!(incompatible(&other, &vb).contains("machine state version"));
    other.version = STATE_VERSION;
    assert!(incompatible(&other, &vb).contains("0 vCPU states for 1 vCPUs"));
    let mut no_iommu = a.state_with(vec![st.vcpus[0].clone()]).unwrap();
    no_iommu.viommu = None;
    assert!(incompatible(&no_iommu, &vb).contains("virtio-iommu presence differs"));
    let mut extra = a.state_with(vec![st.vcpus[0].clone()]).unwrap();
    let f = extra.functions[2].1.clone();
    extra.functions.push((9, f));
    assert!(incompatible(&extra, &vb).contains("no PCI function at 00:09.0"));

    restore(&b, &vb, &st, &[]).unwrap();
    let back = vb[0].get_regs().unwrap();
    assert_eq!((back.rip, back.rbx), (0x12_3456, 0xfeed));
    let again = b
        .state_with(vec![VcpuState::save(
            &vb[0],
            &b.ctx.msr_indices,
            b.ctx.xsave_size,
        )
        .unwrap()])
        .unwrap();
    let json = |v: &MachineState| {
        (
            serde_json::to_string(&v.functions).unwrap(),
            serde_json::to_string(&v.viommu).unwrap(),
        )
    };
    assert_eq!(json(&again), json(&st));
    let fresh = machine_with("64M", &flags)
        .0
        .state_with(Vec::new())
        .unwrap();
    assert_ne!(json(&fresh).0, json(&st).0, "the disk's state is its own");
    let _ = std::fs::remove_file(&disk);
}

/// The shortest records of their kind: a RAM record needs its GPA (then whole pages, none
/// at all being harmless), a device's data its slot word (then any bytes, none included).
#[test]
fn the_shortest_ram_and_device_records() {
    let got = read(&stream_with(|w| {
        w.record(Kind::Ram, &[&0x3000u64.to_le_bytes()]).unwrap();
        w.record(Kind::DeviceData, &[&2u32.to_le_bytes()]).unwrap();
    }))
    .unwrap();
    assert_eq!((got.pages, got.device_data), (0, vec![(2, Vec::new())]));
    let e = read(&stream_with(|w| w.record(Kind::Ram, &[&[0u8; 7]]).unwrap()))
        .err()
        .unwrap();
    assert!(e.contains("(Ram)") && e.contains("not whole pages"), "{e}");
    let e = read(&stream_with(|w| {
        w.record(Kind::DeviceData, &[&[2u8, 0, 0]]).unwrap()
    }))
    .err()
    .unwrap();
    assert!(e.contains("(DeviceData)") && e.contains("no slot"), "{e}");
}

/// Where a guest comes from, as logs name it.
#[test]
fn sources_name_themselves() {
    assert_eq!(
        Source::Snapshot("/tmp/snap".into()).to_string(),
        "snapshot /tmp/snap"
    );
    let a: Address = "unix:/tmp/m.sock".parse().unwrap();
    assert_eq!(Source::Listen(a.clone()).to_string(), a.to_string());
    assert!(!a.to_string().is_empty());
}

/// A snapshot file reads and writes as a connection.
#[test]
fn a_snapshot_file_is_a_connection() {
    let path = std::env::temp_dir().join(format!("vmm-fileconn-{}", std::process::id()));
    let mut c = FileConn(std::fs::File::create(&path).unwrap());
    c.write_all(b"snapshot bytes").unwrap();
    c.flush().unwrap();
    let mut c = FileConn(std::fs::File::open(&path).unwrap());
    let mut back = String::new();
    c.read_to_string(&mut back).unwrap();
    assert_eq!(back, "snapshot bytes");
    let _ = std::fs::remove_file(&path);
}
