//! The capabilities of `VFIO_USER_VERSION` (vfio-user.rst, "VFIO_USER_VERSION"): what the
//! client announces, and what it learns of the server and honours.

use serde::Deserialize;

/// Largest `count` of one data transfer this client takes or sends (`max_data_xfer_size`),
/// in bytes: the protocol's default.
pub const CLIENT_MAX_XFER: u32 = 1 << 20;
/// File descriptors this client accepts in one message.
const CLIENT_MAX_FDS: u32 = 16;

/// Named extensions beyond the specification that a server may announce, each an object with
/// at least `"region"`: the region index the extension's interface lives in. The client uses
/// one only when the server offers it (no device identity is checked).
pub mod ext {
    /// A log of the DMA faults the device took (region layout: `u32 count`, `u32 lost`, then
    /// records of `{u64 iova, u32 flags (bit 0: write), u32 0}`; writing `u32 N` at 0
    /// removes the first N records), signalled on the error IRQ (index 3).
    pub const FAULT_LOG: &str = "vmm-fault-log";
    /// Page requests (the stall model of PCIe PRI): with requests enabled, a transfer that
    /// reaches an IOVA the device cannot access posts a request, signals the error IRQ
    /// (index 3) and waits for the answer. Region layout (little-endian): `u32` enable at 0
    /// (bit 0; read back), `u32` pending at 4, the request's `u64 iova` at 8, `u32 flags` at
    /// 0x10 (bit 0: write), `u32 id` at 0x14; the answer is written at 0x18 as a `u64`: the
    /// id in the low half, [`PRQ_RETRY`] or [`PRQ_INVALID`] in the high half; `u64`
    /// counters at 0x20: requests, retries, invalid answers, timeouts.
    pub const PAGE_REQUEST: &str = "vmm-page-request";
    /// Page-request answer: the page is mapped now; retry the access.
    pub const PRQ_RETRY: u32 = 1;
    /// Page-request answer: the access is not allowed; it faults.
    pub const PRQ_INVALID: u32 = 2;
    /// The server keeps DMA mappings page by page and splits them on a partial unmap, so
    /// the client may merge contiguous guest mappings into one DMA_MAP (an object without
    /// a region: `{}`).
    pub const SPLIT_UNMAP: &str = "vmm-split-unmap";
}

/// The client's capabilities, as JSON for the VERSION request.
pub fn client_json() -> String {
    serde_json::json!({
        "capabilities": {
            "max_msg_fds": CLIENT_MAX_FDS,
            "max_data_xfer_size": CLIENT_MAX_XFER,
            "pgsizes": 4096u64,
            "max_dma_maps": 65535u32,
            "migration": { "pgsize": 4096u64, "max_bitmap_size": u64::from(CLIENT_MAX_XFER) },
        }
    })
    .to_string()
}

/// The `migration` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct MigrationCaps {
    /// Page size of dirty bitmaps, in bytes.
    #[serde(default = "default_pgsize")]
    pub pgsize: u64,
    /// Largest dirty bitmap the server sends, in bytes.
    #[serde(default = "default_bitmap")]
    pub max_bitmap_size: u64,
}

fn default_pgsize() -> u64 {
    4096
}

fn default_bitmap() -> u64 {
    u64::from(CLIENT_MAX_XFER)
}

fn default_fds() -> u32 {
    1
}

fn default_xfer() -> u32 {
    CLIENT_MAX_XFER
}

fn default_maps() -> u32 {
    65535
}

/// What a server announced, with the specification's defaults for what it left out.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServerCaps {
    /// File descriptors the server accepts in one message (default 1).
    #[serde(default = "default_fds")]
    pub max_msg_fds: u32,
    /// Largest `count` of a transfer the server takes (default 1 MiB).
    #[serde(default = "default_xfer")]
    pub max_data_xfer_size: u32,
    /// DMA map windows valid at once (default 65,535).
    #[serde(default = "default_maps")]
    pub max_dma_maps: u32,
    /// Page sizes of DMA maps, or'ed (default 4 KiB only).
    #[serde(default = "default_pgsize")]
    pub pgsizes: u64,
    /// Present when the server announces migration parameters.
    #[serde(default)]
    pub migration: Option<MigrationCaps>,
    /// Everything else, by name (the extensions of [`ext`] among them).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for ServerCaps {
    fn default() -> Self {
        Self {
            max_msg_fds: default_fds(),
            max_data_xfer_size: default_xfer(),
            max_dma_maps: default_maps(),
            pgsizes: default_pgsize(),
            migration: None,
            extra: serde_json::Map::new(),
        }
    }
}

impl ServerCaps {
    /// Parses the version data of a VERSION reply: optional JSON, NUL-terminated.
    ///
    /// # Errors
    /// What is wrong with it (not UTF-8 JSON, a capability of the wrong type, a zero limit).
    pub fn parse(data: &[u8]) -> Result<Self, String> {
        let json = data.strip_suffix(&[0]).unwrap_or(data);
        if json.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Self::default());
        }
        let v: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| format!("capabilities: {e}"))?;
        let Some(c) = v.get("capabilities") else {
            return Ok(Self::default());
        };
        let caps: Self =
            serde_json::from_value(c.clone()).map_err(|e| format!("capabilities: {e}"))?;
        if caps.max_data_xfer_size == 0 || caps.max_msg_fds == 0 {
            return Err("capabilities: a zero max_data_xfer_size or max_msg_fds".into());
        }
        if let Some(m) = caps.migration {
            if !m.pgsize.is_power_of_two() {
                return Err(format!("capabilities: migration pgsize {}", m.pgsize));
            }
        }
        Ok(caps)
    }

    /// The largest transfer both sides take, in bytes.
    pub fn xfer(&self) -> usize {
        self.max_data_xfer_size.min(CLIENT_MAX_XFER) as usize
    }

    /// The region of extension `name` ([`ext`]), if the server offers it.
    pub fn extension_region(&self, name: &str) -> Option<u32> {
        let r = self.extra.get(name)?.get("region")?.as_u64()?;
        u32::try_from(r).ok()
    }

    /// Whether the server offers extension `name` at all.
    pub fn has_extension(&self, name: &str) -> bool {
        self.extra.get(name).is_some_and(|v| v.is_object())
    }

    /// The largest dirty bitmap one report may carry, in bytes.
    pub fn max_bitmap(&self) -> u64 {
        self.migration
            .map_or(u64::from(CLIENT_MAX_XFER), |m| m.max_bitmap_size)
            .clamp(8, u64::from(CLIENT_MAX_XFER) - 64)
    }
}

/// The areas of a region's `VFIO_REGION_INFO_CAP_SPARSE_MMAP` capability (`region_info`: the
/// `struct vfio_region_info` reply with its capability chain), `(offset, size)` page-aligned and
/// inside `region_size`; `None` without the capability.
///
/// # Errors
/// A chain that loops, leaves the reply, or names an area outside the region or unaligned.
pub fn sparse_areas(
    region_info: &[u8],
    region_size: u64,
) -> Result<Option<Vec<(u64, u64)>>, String> {
    use vfio_bindings::bindings::vfio::{
        VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS,
    };
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            region_info.get(o..o + 4)?.try_into().ok()?,
        ))
    };
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            region_info.get(o..o + 8)?.try_into().ok()?,
        ))
    };
    let flags = u32_at(4).unwrap_or(0);
    let mut off = u32_at(12).unwrap_or(0) as usize;
    if flags & VFIO_REGION_INFO_FLAG_CAPS == 0 || off == 0 {
        return Ok(None);
    }
    let mut hops = 0;
    while off != 0 {
        hops += 1;
        if hops > 16 || off < 32 {
            return Err(format!(
                "capability chain at offset {off} loops or points back"
            ));
        }
        let id = u32_at(off).ok_or_else(|| format!("capability at {off} is truncated"))? & 0xffff;
        let next =
            u32_at(off + 4).ok_or_else(|| format!("capability at {off} is truncated"))? as usize;
        if id == VFIO_REGION_INFO_CAP_SPARSE_MMAP {
            let n = u32_at(off + 8).ok_or_else(|| format!("sparse mmap at {off} is truncated"))?;
            if n > 64 {
                return Err(format!("{n} sparse mmap areas"));
            }
            let mut areas = Vec::with_capacity(n as usize);
            for i in 0..n as usize {
                let a = off + 16 + 16 * i;
                let (o, s) = u64_at(a)
                    .zip(u64_at(a + 8))
                    .ok_or_else(|| format!("sparse mmap area {i} is truncated"))?;
                let end = o
                    .checked_add(s)
                    .ok_or_else(|| format!("area {o:#x}+{s:#x} wraps"))?;
                if s == 0 || end > region_size || (o | s) % 4096 != 0 {
                    return Err(format!(
                        "area {o:#x}+{s:#x} unaligned or outside the region of {region_size:#x} bytes"
                    ));
                }
                areas.push((o, s));
            }
            return Ok(Some(areas));
        }
        if next != 0 && next <= off {
            return Err(format!("capability chain at offset {off} does not advance"));
        }
        off = next;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A region info reply of `size` bytes with a sparse-mmap capability of `areas` after
    /// `other` empty capabilities (ids 99), the last pointing at `next_of_last`.
    fn region_info(size: u64, areas: &[(u64, u64)], other: usize) -> Vec<u8> {
        let mut r = vec![0u8; 32];
        r[4..8].copy_from_slice(&(0x8u32 | 0x4).to_le_bytes());
        r[12..16].copy_from_slice(&32u32.to_le_bytes());
        r[16..24].copy_from_slice(&size.to_le_bytes());
        for _ in 0..other {
            let next = (r.len() + 8) as u32;
            r.extend_from_slice(&99u16.to_le_bytes());
            r.extend_from_slice(&1u16.to_le_bytes());
            r.extend_from_slice(&next.to_le_bytes());
        }
        r.extend_from_slice(&1u16.to_le_bytes());
        r.extend_from_slice(&1u16.to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        r.extend_from_slice(&(areas.len() as u32).to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        for &(o, s) in areas {
            r.extend_from_slice(&o.to_le_bytes());
            r.extend_from_slice(&s.to_le_bytes());
        }
        r
    }

    #[test]
    fn sparse_mmap_areas_are_read_and_hostile_chains_refused() {
        let r = region_info(0x4000, &[(0, 0x1000), (0x2000, 0x2000)], 2);
        assert_eq!(
            sparse_areas(&r, 0x4000).unwrap(),
            Some(vec![(0, 0x1000), (0x2000, 0x2000)])
        );
        // Without the CAPS flag: none.
        let mut plain = r.clone();
        plain[4] = 0;
        assert_eq!(sparse_areas(&plain, 0x4000).unwrap(), None);
        // Outside the region, unaligned, truncated.
        assert!(sparse_areas(&region_info(0x1000, &[(0, 0x2000)], 0), 0x1000).is_err());
        assert!(sparse_areas(&region_info(0x4000, &[(0x800, 0x1000)], 0), 0x4000).is_err());
        let cut = region_info(0x4000, &[(0, 0x1000)], 0);
        assert!(sparse_areas(&cut[..cut.len() - 4], 0x4000).is_err());
        // A chain that points back at itself.
        let mut looped = region_info(0x4000, &[], 1);
        looped[36..40].copy_from_slice(&32u32.to_le_bytes());
        assert!(sparse_areas(&looped, 0x4000).is_err());
    }

    #[test]
    fn defaults_limits_and_extensions() {
        assert_eq!(ServerCaps::parse(b"\0").unwrap(), ServerCaps::default());
        assert_eq!(ServerCaps::parse(b"{}\0").unwrap(), ServerCaps::default());
        let c = ServerCaps::parse(
            br#"{"capabilities":{"max_msg_fds":4,"max_data_xfer_size":4096,"pgsizes":4096,
                "migration":{"pgsize":4096,"max_bitmap_size":512},
                "vmm-fault-log":{"region":9},"vmm-split-unmap":{}}}"#,
        )
        .unwrap();
        assert_eq!((c.max_msg_fds, c.xfer(), c.max_bitmap()), (4, 4096, 512));
        assert_eq!(c.extension_region(ext::FAULT_LOG), Some(9));
        assert_eq!(c.extension_region(ext::PAGE_REQUEST), None);
        assert!(c.has_extension(ext::SPLIT_UNMAP));
        assert!(!c.has_extension(ext::PAGE_REQUEST));
        // A server's larger limit does not raise the client's own.
        let big = ServerCaps::parse(br#"{"capabilities":{"max_data_xfer_size":4294967295}}"#);
        assert_eq!(big.unwrap().xfer(), CLIENT_MAX_XFER as usize);
        for bad in [
            &br#"{"capabilities":{"max_msg_fds":"many"}}"#[..],
            br#"{"capabilities":{"max_data_xfer_size":0}}"#,
            br#"{"capabilities":{"migration":{"pgsize":3000}}}"#,
            b"not json",
        ] {
            assert!(
                ServerCaps::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// vfio-user.rst, "VFIO_USER_VERSION": what a server leaves out takes the
    /// specification's default (one descriptor, 1 MiB transfers, 65,535 maps, 4 KiB pages;
    /// a migration object's 4 KiB bitmap pages and 1 MiB bitmaps).
    #[test]
    fn what_a_server_leaves_out_takes_the_specifications_default() {
        let c = ServerCaps::parse(br#"{"capabilities":{"migration":{}}}"#).unwrap();
        assert_eq!(
            c,
            ServerCaps {
                max_msg_fds: 1,
                max_data_xfer_size: 1 << 20,
                max_dma_maps: 65535,
                pgsizes: 4096,
                migration: Some(MigrationCaps {
                    pgsize: 4096,
                    max_bitmap_size: 1 << 20,
                }),
                extra: serde_json::Map::new(),
            }
        );
        assert_eq!(
            c,
            ServerCaps {
                migration: c.migration,
                ..ServerCaps::default()
            }
        );
    }

    /// The client announces its own limits, under the names the specification gives them.
    #[test]
    fn the_client_announces_its_limits() {
        let v: serde_json::Value = serde_json::from_str(&client_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"capabilities": {
                "max_msg_fds": 16,
                "max_data_xfer_size": 1048576,
                "pgsizes": 4096,
                "max_dma_maps": 65535,
                "migration": {"pgsize": 4096, "max_bitmap_size": 1048576},
            }})
        );
    }

    /// A report's bitmap is at least one word and leaves room for the reply's header in one
    /// transfer, whatever the server announced.
    #[test]
    fn the_largest_bitmap_is_clamped_to_a_word_and_a_transfer() {
        let with = |max_bitmap_size| ServerCaps {
            migration: Some(MigrationCaps {
                pgsize: 4096,
                max_bitmap_size,
            }),
            ..ServerCaps::default()
        };
        assert_eq!(ServerCaps::default().max_bitmap(), (1 << 20) - 64);
        assert_eq!(with(0).max_bitmap(), 8);
        assert_eq!(with(4096).max_bitmap(), 4096);
        assert_eq!(with(u64::MAX).max_bitmap(), (1 << 20) - 64);
    }

    /// The bounds of a sparse-mmap capability, each at its edge: an area may end at the
    /// region's end but not be empty; 64 areas are read, 65 refused; a chain of 16
    /// capabilities is followed, 17 refused; a capability inside the fixed part, or one
    /// naming itself as next, is refused.
    #[test]
    fn sparse_mmap_bounds_hold_at_their_edges() {
        let r = region_info(0x4000, &[(0x3000, 0x1000)], 0);
        assert_eq!(
            sparse_areas(&r, 0x4000).unwrap(),
            Some(vec![(0x3000, 0x1000)])
        );
        assert!(sparse_areas(&region_info(0x4000, &[(0x1000, 0)], 0), 0x4000).is_err());
        // An offset and a size off a page by the same amount (their XOR is aligned).
        assert!(sparse_areas(&region_info(0x4000, &[(0x800, 0x1800)], 0), 0x4000).is_err());
        let many: Vec<(u64, u64)> = (0..65).map(|i| (i * 0x1000, 0x1000)).collect();
        let r = region_info(0x100_0000, &many[..64], 0);
        assert_eq!(sparse_areas(&r, 0x100_0000).unwrap().unwrap().len(), 64);
        let e = sparse_areas(&region_info(0x100_0000, &many, 0), 0x100_0000).unwrap_err();
        assert_eq!(e, "65 sparse mmap areas");
        let r = region_info(0x4000, &[(0, 0x1000)], 15);
        assert_eq!(sparse_areas(&r, 0x4000).unwrap(), Some(vec![(0, 0x1000)]));
        assert!(sparse_areas(&region_info(0x4000, &[(0, 0x1000)], 16), 0x4000).is_err());
        let mut inside = region_info(0x4000, &[(0, 0x1000)], 0);
        inside[12..16].copy_from_slice(&16u32.to_le_bytes());
        assert!(sparse_areas(&inside, 0x4000).is_err());
        // Capability 99 at 32 names 32 + 8 (the sparse one) next; make it name itself.
        let mut own = region_info(0x4000, &[(0, 0x1000)], 1);
        own[36..40].copy_from_slice(&32u32.to_le_bytes());
        assert_eq!(
            sparse_areas(&own, 0x4000).unwrap_err(),
            "capability chain at offset 32 does not advance"
        );
        // The capability's id is its low 16 bits (the version is the high half).
        let mut versioned = region_info(0x4000, &[(0, 0x1000)], 0);
        versioned[34..36].copy_from_slice(&7u16.to_le_bytes());
        assert_eq!(
            sparse_areas(&versioned, 0x4000).unwrap(),
            Some(vec![(0, 0x1000)])
        );
    }
}
