//! Fuzzes what a hostile snapshot or migration stream meets first on the receiving side: the
//! stream reader (framing, checksums, record kinds and sizes, pages inside guest RAM, the
//! configuration check, the machine state's JSON), then the virtio-iommu state restored into
//! a device whose endpoints have a recording host backend. The input is everything after a
//! valid header and configuration record. Nothing may panic (the recording backend also
//! panics when the vIOMMU would map over a mapping or split one, as a host would refuse).
#![no_main]

use iommu::backend::RecordingBackend;
use iommu::{BackendCaps, Viommu, ViommuConfig};
use libfuzzer_sys::fuzz_target;
use vmm::migration::stream::{Kind, StreamWriter};
use vmm::machine::devices::DeviceKind;
use vmm::machine::MachineConfig;
use vmm::migration::read_stream;

const RAM: u64 = 64 << 20;

fn config() -> MachineConfig {
    MachineConfig {
        memory: RAM,
        cpus: 1,
        functions: vec![(0, DeviceKind::HostBridge), (1, DeviceKind::VirtioIommu)],
    }
}

fuzz_target!(|data: &[u8]| {
    let mut stream = Vec::new();
    {
        let mut w = StreamWriter::new(&mut stream).unwrap();
        w.json(Kind::Config, &config()).unwrap();
        w.flush().unwrap();
    }
    stream.extend_from_slice(data);
    let ram = [(0u64, RAM)];
    let Ok(incoming) = read_stream(&stream[..], &config(), &ram, |gpa, bytes| {
        assert!(gpa + bytes.len() as u64 <= RAM);
        Ok(())
    }) else {
        return;
    };
    if let Some(state) = &incoming.state.viommu {
        let mut v = Viommu::new(ViommuConfig {
            guest_ram: ram.to_vec(),
            max_domains: 64,
            metadata_budget: 16 << 20,
            ..Default::default()
        });
        let (backend, _log) = RecordingBackend::new(
            "fuzz",
            BackendCaps {
                dirty_tracking: true,
                merge_maps: true,
                merge_unmaps: true,
                ..Default::default()
            },
        );
        let b = v.add_backend(Box::new(backend)).unwrap();
        v.add_endpoint(0x10, Some(b), &[]).unwrap();
        v.add_endpoint(0x18, None, &[]).unwrap();
        let _ = v.restore_state(state);
    }
});
