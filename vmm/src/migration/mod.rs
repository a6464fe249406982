//! Snapshots and live migration.
//!
//! Migration works on a running [`crate::machine::Machine`]. It is
//! pre-copy: every page is sent once while the guest runs, then the pages dirtied meanwhile
//! (by vCPUs through KVM's dirty log, by the VMM's emulated devices through vm-memory's
//! bitmap, by passthrough devices through their dirty logs harvested by the vIOMMU) are sent
//! again, round after round, until few remain; then the guest is paused, passthrough devices
//! are stopped (VFIO migration v2 STOP), the last dirty pages and every piece of state are
//! sent, and the destination takes over. A snapshot is the same stream with one full copy of
//! RAM, written to a file while the guest is paused.

pub mod bounds;
pub use bounds::Conn;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzzing;
pub mod peer;
mod recv;
mod send;
pub mod stream;

use serde::{Deserialize, Serialize};

use crate::machine::MachineError;

pub use recv::{read_stream, read_stream_from, receive, HandoverResolver, Incoming, Source};
pub use send::{migrate, resume_after_handover, snapshot, MigrateOptions, MigrationReport};

/// Why a snapshot, restore or migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream (file or connection) failed or was refused.
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    /// The two sides are not the same machine.
    #[error("incompatible machines: {0}")]
    Incompatible(String),
    /// Something could not be saved or restored.
    #[error("{0}")]
    State(String),
    /// Connecting or listening failed.
    #[error("{0}: {1}")]
    Transport(String, #[source] std::io::Error),
    /// The other side refused.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// The VM is not in a state that allows it.
    #[error("{0}")]
    Busy(String),
    /// RAM differs between the two sides after the last copy.
    #[error("verify: {0}")]
    Verify(String),
    /// The source aborted the hand-over (it runs the guest).
    #[error("the source aborted the migration ({0}); this side discards the guest")]
    Aborted(String),
    /// The hand-over could not be confirmed: neither side runs the guest on its own.
    #[error("hand-over unconfirmed: {0}")]
    Unconfirmed(String),
    /// Pausing, saving, stopping or tracking the running machine failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
}

fn state_err(e: impl std::fmt::Display) -> MigrationError {
    MigrationError::State(e.to_string())
}

/// How the hand-over at the end of a migration goes (the `HANDOVER` record), and for a
/// snapshot whether it carries RAM hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// Compare every RAM page of both sides (by hash) before the guest runs again.
    pub verify: bool,
    /// Milliseconds each side waits for the other's next hand-over message.
    pub timeout_ms: u64,
}

/// Hash of every 4 KiB page of `ram_ranges` (`(GPA, bytes)`) in `mem`, in GPA order (the
/// order both sides walk). Both sides run the same VMM, so the same hash function.
///
/// `data`, when given, lists the `(GPA, bytes)` extents that may hold data (sorted, from
/// [`crate::machine::memory::GuestRam::data_extents`]): a page outside all of them is
/// never-touched RAM, which reads as zero, so it gets the zero page's hash without being
/// read. Reading them would allocate them on both sides: a 4 GiB guest that
/// touched 300 MiB would end a verified migration holding 4 GiB on each host.
///
/// # Errors
/// When a page cannot be read.
pub fn page_hashes(
    mem: &devices::GuestMemoryMmap,
    ram_ranges: &[(u64, u64)],
    data: Option<&[(u64, u64)]>,
) -> Result<Vec<u64>, MigrationError> {
    use std::hash::{DefaultHasher, Hasher};
    use vm_memory::{Bytes, GuestAddress};
    let hash = |page: &[u8]| {
        let mut h = DefaultHasher::new();
        h.write(page);
        h.finish()
    };
    let zero = hash(&[0u8; 4096]);
    // The extents are sorted and pages are walked in GPA order: one cursor suffices.
    let mut extents = data.map(|d| d.iter().peekable());
    let mut holds_data = |page: u64| match &mut extents {
        None => true,
        Some(it) => {
            while it.next_if(|&&(g, l)| g + l <= page).is_some() {}
            it.peek().is_some_and(|&&(g, _)| g < page + 4096)
        }
    };
    let pages: u64 = ram_ranges.iter().map(|r| r.1 / 4096).sum();
    let mut out = Vec::with_capacity(pages as usize);
    let mut buf = [0u8; 4096];
    for &(gpa, len) in ram_ranges {
        for at in (gpa..gpa + len).step_by(4096) {
            if holds_data(at) {
                mem.read_slice(&mut buf, GuestAddress(at))
                    .map_err(|e| state_err(format!("hashing RAM at {at:#x}: {e}")))?;
                out.push(hash(&buf));
            } else {
                out.push(zero);
            }
        }
    }
    Ok(out)
}

/// [`page_hashes`] of the machine's RAM, skipping the memfd's holes.
pub(crate) fn ram_hashes(m: &crate::machine::Machine) -> Result<Vec<u64>, MigrationError> {
    page_hashes(
        &m.ram.mem,
        &m.devices.ram_ranges,
        Some(&m.ram.data_extents()),
    )
}

/// GPAs of the pages whose hashes differ between `ours` and `theirs` (both from
/// [`page_hashes`] over `ram_ranges`); pages one side lacks count as differing.
pub fn differing_pages(ours: &[u64], theirs: &[u64], ram_ranges: &[(u64, u64)]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut i = 0usize;
    for &(gpa, len) in ram_ranges {
        for p in 0..len / 4096 {
            if ours.get(i) != theirs.get(i) || ours.get(i).is_none() {
                out.push(gpa + p * 4096);
            }
            i += 1;
        }
    }
    out
}

/// A verify failure's message: how many pages differ and the first GPAs.
fn verify_failure(gpas: &[u64]) -> String {
    let shown: Vec<String> = gpas.iter().take(32).map(|g| format!("{g:#x}")).collect();
    format!(
        "{} pages differ between source and destination: {}{}",
        gpas.len(),
        shown.join(" "),
        if gpas.len() > shown.len() { " ..." } else { "" }
    )
}

/// A fault the tests inject into the hand-over (test only): `VMM_TEST_HANDOVER_FAULT` holds
/// comma-separated `name` or `name=N` entries: `drop-ack`, `delay-ack=MS` (destination),
/// `drop-commit`, `stall-before-commit=MS` (source), `drop-done`, `stream-ms=MS` (the
/// destination's [`bounds::STREAM`] and [`bounds::IDLE`], shortened). Returns
/// `Some(N)` (0 without a value) when `name` is set. Always `None` without the cargo feature
/// `test-hooks`.
#[cfg(not(feature = "test-hooks"))]
pub(crate) fn test_fault(_name: &str) -> Option<u64> {
    None
}

/// A fault the tests inject into the hand-over (see above).
#[cfg(feature = "test-hooks")]
pub(crate) fn test_fault(name: &str) -> Option<u64> {
    let v = std::env::var("VMM_TEST_HANDOVER_FAULT").ok()?;
    v.split(',').find_map(|e| {
        let (k, n) = e.split_once('=').unwrap_or((e, "0"));
        (k.trim() == name).then(|| n.trim().parse().unwrap_or(0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_pages_are_named_by_gpa() {
        let ram = [(0u64, 3 * 4096u64), (0x10_0000, 2 * 4096)];
        let ours = [1, 2, 3, 4, 5];
        assert!(differing_pages(&ours, &ours, &ram).is_empty());
        assert_eq!(
            differing_pages(&ours, &[1, 9, 3, 4, 0], &ram),
            vec![0x1000, 0x10_1000]
        );
        // Hashes one side lacks count as differing.
        assert_eq!(
            differing_pages(&ours, &[1, 2, 3], &ram),
            vec![0x10_0000, 0x10_1000]
        );
        let msg = verify_failure(&(0..40).map(|p| p * 4096).collect::<Vec<_>>());
        assert!(
            msg.starts_with("40 pages differ") && msg.ends_with(" ..."),
            "{msg}"
        );
    }

    /// Verify sees a change of any byte of a page, in RAM below and above the PCI hole: the
    /// pages whose first or last byte alone changed, and only they, differ.
    #[test]
    fn verify_sees_one_byte_anywhere_in_a_page() {
        use vm_memory::{Bytes, GuestAddress};
        let ram = [(0u64, 16 * 4096u64), (0x1_0000_0000, 8 * 4096)];
        let ranges: Vec<(GuestAddress, usize)> = ram
            .iter()
            .map(|&(g, l)| (GuestAddress(g), l as usize))
            .collect();
        let mem = devices::GuestMemoryMmap::from_ranges(&ranges).unwrap();
        for &(g, l) in &ram {
            mem.write_slice(&vec![0x5a; l as usize], GuestAddress(g))
                .unwrap();
        }
        let before = page_hashes(&mem, &ram, None).unwrap();
        assert_eq!(before.len(), 24);
        let changed = [
            (0x3000 + 4095, 0x3000),               // the last byte of a page below 4 GiB
            (0x1_0000_5000 + 4095, 0x1_0000_5000), // the last byte above the hole
            (0x1_0000_0000, 0x1_0000_0000),        // the first byte of the upper region
        ];
        for (at, _) in changed {
            mem.write_obj(0xa5u8, GuestAddress(at)).unwrap();
        }
        let after = page_hashes(&mem, &ram, None).unwrap();
        let differ: std::collections::BTreeSet<u64> =
            differing_pages(&before, &after, &ram).into_iter().collect();
        let want: std::collections::BTreeSet<u64> = changed.iter().map(|c| c.1).collect();
        assert_eq!(differ, want);
    }

    #[test]
    fn hashes_records_go_in_order_and_stay_inside_ram() {
        let mut w = stream::StreamWriter::new(Vec::new()).unwrap();
        let hashes: Vec<u64> = (0..(stream::MAX_HASHES_RECORD + 5)).collect();
        w.hashes(&hashes).unwrap();
        let bytes = w.get_mut().clone();
        let mut r = stream::StreamReader::new(&bytes[..]).unwrap();
        let mut got = Vec::new();
        for i in 0..2 {
            let (k, payload) = r.next_record().unwrap();
            assert_eq!(k, stream::Kind::Hashes);
            stream::add_hashes(&mut got, &payload, hashes.len() as u64, i).unwrap();
        }
        assert_eq!(got, hashes);
        // Out of order, past RAM, or ragged: refused.
        let mut again = got.clone();
        let mut rec = 0u64.to_le_bytes().to_vec();
        rec.extend(7u64.to_le_bytes());
        assert!(stream::add_hashes(&mut again, &rec, u64::MAX, 0).is_err());
        assert!(stream::add_hashes(&mut Vec::new(), &rec, 0, 0).is_err());
        assert!(stream::add_hashes(&mut Vec::new(), &rec[..12], 10, 0).is_err());
    }
}
