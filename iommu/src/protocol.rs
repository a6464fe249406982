//! Wire types of the virtio-iommu device (virtio 1.3, section 5.13 "IOMMU Device";
//! Linux `include/uapi/linux/virtio_iommu.h`). Every multi-byte field is little-endian; byte
//! conversions are derived with `zerocopy`, never hand-cast. Generic virtio constants (the
//! device ID, `VIRTIO_F_VERSION_1`) come from `virtio-bindings`; it has no
//! `virtio_iommu.h`, so the device's own definitions are kept here, each with its section.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// virtio device ID of the IOMMU (5.13.1).
pub use virtio_bindings::virtio_ids::VIRTIO_ID_IOMMU;
/// Index of the request virtqueue (5.13.2).
pub const REQUEST_QUEUE: usize = 0;
/// Index of the event virtqueue (5.13.2).
pub const EVENT_QUEUE: usize = 1;

/// Feature bits (5.13.3).
pub mod features {
    /// `input_range` is valid.
    pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
    /// `domain_range` is valid.
    pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
    /// MAP and UNMAP requests are available.
    pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
    /// Legacy: unattached endpoints bypass (new devices SHOULD NOT offer it).
    pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
    /// PROBE requests are available.
    pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
    /// `VIRTIO_IOMMU_MAP_F_MMIO` is available.
    pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
    /// The `bypass` config field and `ATTACH_F_BYPASS` are available.
    pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;
    /// virtio 1.x device.
    pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
}

/// Request types (5.13.6).
pub const VIRTIO_IOMMU_T_ATTACH: u8 = 1;
/// DETACH.
pub const VIRTIO_IOMMU_T_DETACH: u8 = 2;
/// MAP.
pub const VIRTIO_IOMMU_T_MAP: u8 = 3;
/// UNMAP.
pub const VIRTIO_IOMMU_T_UNMAP: u8 = 4;
/// PROBE.
pub const VIRTIO_IOMMU_T_PROBE: u8 = 5;

/// A request status (5.13.6, "status codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// All good.
    Ok = 0,
    /// Virtio communication error.
    IoErr = 1,
    /// Unsupported request.
    Unsupp = 2,
    /// Internal device error.
    DevErr = 3,
    /// Invalid parameters.
    Inval = 4,
    /// Out-of-range parameters.
    Range = 5,
    /// Entry not found.
    NoEnt = 6,
    /// Bad address.
    Fault = 7,
    /// Insufficient resources.
    NoMem = 8,
}

impl Status {
    /// All statuses, in code order.
    pub const ALL: [Status; 9] = [
        Status::Ok,
        Status::IoErr,
        Status::Unsupp,
        Status::DevErr,
        Status::Inval,
        Status::Range,
        Status::NoEnt,
        Status::Fault,
        Status::NoMem,
    ];

    /// The spec's name (`VIRTIO_IOMMU_S_*`).
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::IoErr => "IOERR",
            Status::Unsupp => "UNSUPP",
            Status::DevErr => "DEVERR",
            Status::Inval => "INVAL",
            Status::Range => "RANGE",
            Status::NoEnt => "NOENT",
            Status::Fault => "FAULT",
            Status::NoMem => "NOMEM",
        }
    }

    /// From a status byte.
    pub fn from_u8(v: u8) -> Option<Status> {
        Status::ALL.get(usize::from(v)).copied()
    }
}

/// `ATTACH_F_BYPASS`: create a bypass domain (5.13.6.1).
pub const VIRTIO_IOMMU_ATTACH_F_BYPASS: u32 = 1;
/// MAP flag: reads allowed (5.13.6.3).
pub const VIRTIO_IOMMU_MAP_F_READ: u32 = 1;
/// MAP flag: writes allowed.
pub const VIRTIO_IOMMU_MAP_F_WRITE: u32 = 2;
/// MAP flag: the target is MMIO.
pub const VIRTIO_IOMMU_MAP_F_MMIO: u32 = 4;
/// Every MAP flag this device knows.
pub const VIRTIO_IOMMU_MAP_F_MASK: u32 = 7;

/// PROBE property type RESV_MEM (5.13.6.6).
pub const VIRTIO_IOMMU_PROBE_T_RESV_MEM: u16 = 1;
/// RESV_MEM subtype: reserved, cannot be mapped.
pub const VIRTIO_IOMMU_RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: an MSI doorbell.
pub const VIRTIO_IOMMU_RESV_MEM_T_MSI: u8 = 1;

/// Fault reasons (5.13.6.7).
pub const VIRTIO_IOMMU_FAULT_R_UNKNOWN: u8 = 0;
/// The endpoint is not attached to a domain.
pub const VIRTIO_IOMMU_FAULT_R_DOMAIN: u8 = 1;
/// The address is not mapped, or not with the needed permission.
pub const VIRTIO_IOMMU_FAULT_R_MAPPING: u8 = 2;
/// Fault flag: the access was a read.
pub const VIRTIO_IOMMU_FAULT_F_READ: u32 = 1;
/// Fault flag: the access was a write.
pub const VIRTIO_IOMMU_FAULT_F_WRITE: u32 = 2;
/// Fault flag: `address` is valid.
pub const VIRTIO_IOMMU_FAULT_F_ADDRESS: u32 = 1 << 8;

/// `struct virtio_iommu_range_64`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Range64 {
    /// First address.
    pub start: U64,
    /// Last address (inclusive).
    pub end: U64,
}

/// `struct virtio_iommu_range_32`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Range32 {
    /// First value.
    pub start: U32,
    /// Last value (inclusive).
    pub end: U32,
}

/// `struct virtio_iommu_config` (5.13.4), 40 bytes.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Config {
    /// Page sizes that can be mapped; the lowest set bit is the granule.
    pub page_size_mask: U64,
    /// IOVAs that can be mapped.
    pub input_range: Range64,
    /// Domain IDs that can be used.
    pub domain_range: Range32,
    /// Bytes of properties in a PROBE reply.
    pub probe_size: U32,
    /// Unattached endpoints bypass the IOMMU (0 or 1); the only writable field.
    pub bypass: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

/// Offset of `bypass` in [`Config`].
pub const CONFIG_BYPASS_OFFSET: usize = 36;

/// `struct virtio_iommu_req_head`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReqHead {
    /// Request type.
    pub type_: u8,
    /// Reserved; the device ignores it.
    pub reserved: [u8; 3],
}

/// `struct virtio_iommu_req_tail`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReqTail {
    /// [`Status`] code.
    pub status: u8,
    /// Reserved; set to zero.
    pub reserved: [u8; 3],
}

/// Body of `struct virtio_iommu_req_attach` (after the head, before the tail).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AttachBody {
    /// Domain ID.
    pub domain: U32,
    /// Endpoint ID.
    pub endpoint: U32,
    /// `ATTACH_F_*`.
    pub flags: U32,
    /// Must be zero.
    pub reserved: [u8; 4],
}

/// Body of `struct virtio_iommu_req_detach`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DetachBody {
    /// Domain ID.
    pub domain: U32,
    /// Endpoint ID.
    pub endpoint: U32,
    /// Ignored.
    pub reserved: [u8; 8],
}

/// Body of `struct virtio_iommu_req_map`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct MapBody {
    /// Domain ID.
    pub domain: U32,
    /// First IOVA.
    pub virt_start: U64,
    /// Last IOVA (inclusive).
    pub virt_end: U64,
    /// First GPA.
    pub phys_start: U64,
    /// `MAP_F_*`.
    pub flags: U32,
}

/// Body of `struct virtio_iommu_req_unmap`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct UnmapBody {
    /// Domain ID.
    pub domain: U32,
    /// First IOVA.
    pub virt_start: U64,
    /// Last IOVA (inclusive).
    pub virt_end: U64,
    /// Should be zero.
    pub reserved: [u8; 4],
}

/// Device-readable body of `struct virtio_iommu_req_probe`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ProbeBody {
    /// Endpoint ID.
    pub endpoint: U32,
    /// Ignored.
    pub reserved: [u8; 64],
}

impl Default for ProbeBody {
    fn default() -> Self {
        Self {
            endpoint: U32::new(0),
            reserved: [0; 64],
        }
    }
}

/// `struct virtio_iommu_probe_property` header.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ProbeProperty {
    /// Type in bits 0-11; bits 12-15 reserved.
    pub type_: U16,
    /// Length of the value after this header, bytes.
    pub length: U16,
}

/// `struct virtio_iommu_probe_resv_mem`, header included.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ProbeResvMem {
    /// Property header (type RESV_MEM, length 20).
    pub head: ProbeProperty,
    /// `RESV_MEM_T_*`.
    pub subtype: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// First reserved IOVA.
    pub start: U64,
    /// Last reserved IOVA (inclusive).
    pub end: U64,
}

/// `struct virtio_iommu_fault`, written to the event queue.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct Fault {
    /// `FAULT_R_*`.
    pub reason: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// `FAULT_F_*`.
    pub flags: U32,
    /// Endpoint that faulted.
    pub endpoint: U32,
    /// Zero.
    pub reserved1: [u8; 4],
    /// Faulting address when `FAULT_F_ADDRESS` is set.
    pub address: U64,
}

/// Size of the device-readable part of each request type (head + body), or `None` for an
/// unknown type.
pub fn request_size(type_: u8) -> Option<usize> {
    let head = std::mem::size_of::<ReqHead>();
    Some(
        head + match type_ {
            VIRTIO_IOMMU_T_ATTACH => std::mem::size_of::<AttachBody>(),
            VIRTIO_IOMMU_T_DETACH => std::mem::size_of::<DetachBody>(),
            VIRTIO_IOMMU_T_MAP => std::mem::size_of::<MapBody>(),
            VIRTIO_IOMMU_T_UNMAP => std::mem::size_of::<UnmapBody>(),
            VIRTIO_IOMMU_T_PROBE => std::mem::size_of::<ProbeBody>(),
            _ => return None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    /// Status names and values as `include/uapi/linux/virtio_iommu.h` defines them, and the
    /// fault flag values of 5.13.6.7.
    #[test]
    fn status_values_names_and_fault_flags_match_the_spec() {
        let spec = [
            (0u8, "OK"),
            (1, "IOERR"),
            (2, "UNSUPP"),
            (3, "DEVERR"),
            (4, "INVAL"),
            (5, "RANGE"),
            (6, "NOENT"),
            (7, "FAULT"),
            (8, "NOMEM"),
        ];
        for (v, name) in spec {
            let s = Status::from_u8(v).unwrap();
            assert_eq!((s as u8, s.name()), (v, name));
        }
        assert_eq!(Status::from_u8(9), None);
        assert_eq!(VIRTIO_IOMMU_FAULT_F_READ, 1);
        assert_eq!(VIRTIO_IOMMU_FAULT_F_WRITE, 2);
        assert_eq!(VIRTIO_IOMMU_FAULT_F_ADDRESS, 0x100);
    }

    #[test]
    fn sizes_match_the_spec() {
        assert_eq!(size_of::<Config>(), 40);
        assert_eq!(
            size_of::<ReqHead>() + size_of::<AttachBody>() + size_of::<ReqTail>(),
            24
        );
        assert_eq!(
            size_of::<ReqHead>() + size_of::<DetachBody>() + size_of::<ReqTail>(),
            24
        );
        assert_eq!(
            size_of::<ReqHead>() + size_of::<MapBody>() + size_of::<ReqTail>(),
            40
        );
        assert_eq!(
            size_of::<ReqHead>() + size_of::<UnmapBody>() + size_of::<ReqTail>(),
            32
        );
        assert_eq!(size_of::<ReqHead>() + size_of::<ProbeBody>(), 72);
        assert_eq!(size_of::<ProbeResvMem>(), 24);
        assert_eq!(size_of::<Fault>(), 24);
        let c = Config {
            bypass: 1,
            ..Default::default()
        };
        assert_eq!(c.as_bytes()[CONFIG_BYPASS_OFFSET], 1);
    }

    #[test]
    fn little_endian_fields() {
        let m = MapBody {
            domain: U32::new(0x0102_0304),
            virt_start: U64::new(0x1000),
            ..Default::default()
        };
        assert_eq!(&m.as_bytes()[..6], &[4, 3, 2, 1, 0, 0x10]);
    }
}
