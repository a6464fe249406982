//! Guest memory as a device behind the virtio-iommu sees it: every address is an IOVA of the
//! device's endpoint, translated through the mapping core with a permission check on every
//! access. It implements `vm_memory::GuestMemory`, so `virtio-queue` reads rings and
//! descriptors through it unchanged. Slices come from the physical memory, so the VMM's own
//! writes keep marking the GPA dirty bitmap that migration reads.

use std::iter::FusedIterator;
use std::sync::Arc;

use iommu::Access;
use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, Permissions, VolatileSlice,
};

use super::iommu::IommuHandle;
use crate::GuestMemoryMmap;

/// The IOVA space of one endpoint.
#[derive(Clone)]
pub struct IovaMemory {
    phys: Arc<GuestMemoryMmap>,
    iommu: IommuHandle,
    endpoint: u32,
}

impl IovaMemory {
    /// The IOVA space of `endpoint` over `phys`.
    pub fn new(phys: Arc<GuestMemoryMmap>, iommu: IommuHandle, endpoint: u32) -> Self {
        Self {
            phys,
            iommu,
            endpoint,
        }
    }

    /// The endpoint ID.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// Translates `[addr, addr + count)` for `access`; a refusal raises a fault event.
    fn translate(&self, addr: u64, count: usize, access: Permissions) -> Option<Vec<(u64, u64)>> {
        let mut runs = Vec::new();
        let checks: &[Access] = match access {
            Permissions::ReadWrite => &[Access::Read, Access::Write],
            Permissions::Write => &[Access::Write],
            _ => &[Access::Read],
        };
        let mut state = self.iommu.lock();
        for &a in checks {
            if state
                .translate(self.endpoint, addr, count as u64, a, &mut runs)
                .is_err()
            {
                drop(state);
                self.iommu.notify_fault();
                return None;
            }
        }
        Some(runs)
    }
}

/// The physical slices of a translated range.
pub struct IovaSlices<'a> {
    phys: &'a GuestMemoryMmap,
    runs: std::vec::IntoIter<(u64, u64)>,
    cur: Option<GuestMemoryBackendSliceIterator<'a, GuestMemoryMmap>>,
    done: bool,
}

impl<'a> Iterator for IovaSlices<'a> {
    type Item = vm_memory::guest_memory::Result<VolatileSlice<'a, BS<'a, AtomicBitmap>>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            if let Some(it) = self.cur.as_mut() {
                match it.next() {
                    Some(Ok(s)) => return Some(Ok(s)),
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    None => self.cur = None,
                }
            }
            let Some((gpa, len)) = self.runs.next() else {
                self.done = true;
                return None;
            };
            let Ok(len) = usize::try_from(len) else {
                self.done = true;
                return Some(Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(
                    gpa,
                ))));
            };
            self.cur = Some(GuestMemoryBackend::get_slices(
                self.phys,
                GuestAddress(gpa),
                len,
            ));
        }
    }
}

impl FusedIterator for IovaSlices<'_> {}
impl<'a> GuestMemorySliceIterator<'a, BS<'a, AtomicBitmap>> for IovaSlices<'a> {}

impl GuestMemory for IovaMemory {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = AtomicBitmap;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        match self.translate(addr.0, count, access) {
            Some(runs) => runs.iter().all(|&(g, l)| {
                usize::try_from(l).is_ok_and(|l| {
                    GuestMemoryBackend::check_range(self.phys.as_ref(), GuestAddress(g), l)
                })
            }),
            None => false,
        }
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::guest_memory::Result<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>>
    {
        let runs = self
            .translate(addr.0, count, access)
            .ok_or(GuestMemoryError::InvalidGuestAddress(addr))?;
        Ok(IovaSlices {
            phys: &self.phys,
            runs: runs.into_iter(),
            cur: None,
            done: false,
        })
    }
}
