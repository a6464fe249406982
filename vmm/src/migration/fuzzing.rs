//! The body of the `migration_stream` fuzz target (`devices/fuzz`, run by `tests/fuzz.sh`);
//! the unit tests below run it over the minimal stream's records and over random and mutated
//! inputs, so the test command exercises it without building the fuzzer.

use iommu::backend::RecordingBackend;
use iommu::{BackendCaps, Viommu, ViommuConfig};

use super::read_stream;
use super::stream::{Kind, StreamWriter};
use crate::machine::devices::DeviceKind;
use crate::machine::MachineConfig;

/// Guest RAM of the fuzzed machine: 64 MiB at GPA 0.
const RAM: u64 = 64 << 20;

/// The machine the stream is checked against: one vCPU, a host bridge and a virtio-iommu.
fn config() -> MachineConfig {
    MachineConfig {
        memory: RAM,
        cpus: 1,
        functions: vec![
            (0, DeviceKind::HostBridge),
            (1, DeviceKind::VirtioIommu),
            (2, DeviceKind::VfioUser),
        ],
    }
}

/// What a hostile snapshot or migration stream meets first on the receiving side: the
/// stream reader (framing, checksums, record kinds and sizes, pages inside guest RAM, the
/// configuration check, the machine state's JSON), then the vCPUs' KVM state checked and
/// built as the ioctls would get it (`VcpuState::check`), and the virtio-iommu state restored
/// into a device whose endpoints have a recording host backend. `data` describes what follows a
/// valid header and configuration record: its first byte's low bit chooses
/// - 0: the rest as raw bytes (framing, checksums and lengths are the fuzzer's);
/// - 1: the rest as records `[kind, length (u16 LE), payload]`, each written with its
///   checksum, so that mutations reach what records say rather than stopping at the CRC.
///
/// # Panics
/// When a page lands outside guest RAM, when the vIOMMU would map over a mapping or split
/// one (the recording backend refuses both, as a host would), or when anything below panics.
pub fn migration_stream(data: &[u8]) {
    let mut stream = Vec::new();
    {
        let mut w = StreamWriter::new(&mut stream).unwrap();
        w.json(Kind::Config, &config()).unwrap();
        match data.split_first() {
            Some((mode, mut rest)) if mode & 1 == 1 => {
                while let [kind, l0, l1, tail @ ..] = rest {
                    let len = usize::from(u16::from_le_bytes([*l0, *l1])).min(tail.len());
                    let (payload, next) = tail.split_at(len);
                    if let Some(kind) = Kind::from_u8(*kind) {
                        w.record(kind, &[payload]).unwrap();
                    }
                    rest = next;
                }
            }
            Some((_, raw)) => w.get_mut().extend_from_slice(raw),
            None => {}
        }
        w.flush().unwrap();
    }
    let ram = [(0u64, RAM)];
    let Ok(incoming) = read_stream(&stream[..], &config(), &ram, |gpa, bytes| {
        assert!(gpa + bytes.len() as u64 <= RAM);
        Ok(())
    }) else {
        return;
    };
    // The vCPUs' KVM state, up to the ioctls (which would fuzz the host's KVM): whatever its
    // bytes, what is checked for a host with no XSAVE, the legacy area, or a larger one is
    // exactly what was saved.
    for vcpu in &incoming.state.vcpus {
        for size in [0, 4096, 4096 + 2688] {
            if let Ok(checked) = vcpu.check(size) {
                let (fpu, xsave) = checked.images(size);
                assert_eq!(fpu, vcpu.fpu, "the FPU state loaded is the one saved");
                assert_eq!(xsave, vcpu.xsave, "the XSAVE area loaded is the one saved");
            }
        }
    }
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
}

#[cfg(test)]
mod tests;
