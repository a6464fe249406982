//! Harvest cost per GiB of guest memory: a 1 GiB guest whose RAM is all mapped for a device
//! (as 4 KiB mappings, the page-granular worst case, and as 2 MiB mappings), 1% of its
//! pages written by the device. The harvest reads the device's dirty bits by IOVA in windows
//! and translates them to guest pages through the page table, skipping clean words.
//!
//! Baseline, in the same run: the naive translation, one page-table lookup and one bitmap
//! update per dirty IOVA bit, bit by bit over the whole IOVA range. Prints both and the ratio;
//! criterion then measures them again.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use iommu::backend::{BackendCaps, BackendError, DmaBackend};
use iommu::dirty::DirtyBitmap;
use iommu::pagetable::{IoPageTable, Perm};
use iommu::protocol::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
use iommu::testing::{attach, map};
use iommu::{Request, Viommu, ViommuConfig};

const GIB: u64 = 1 << 30;
const PAGES: u64 = GIB >> 12;
const IOVA: u64 = 1 << 40;

/// A device whose dirty log is a bitmap by IOVA page (what real dirty trackers keep).
struct BitmapDevice {
    dirty: Arc<Mutex<Vec<u64>>>,
}

impl DmaBackend for BitmapDevice {
    fn name(&self) -> String {
        "bench".into()
    }
    fn caps(&self) -> BackendCaps {
        BackendCaps {
            dirty_tracking: true,
            merge_maps: true,
            merge_unmaps: true,
            ..Default::default()
        }
    }
    fn map(&mut self, _: u64, _: u64, _: u64, _: Perm) -> Result<(), BackendError> {
        Ok(())
    }
    fn unmap(&mut self, _: u64, _: u64) -> Result<(), BackendError> {
        Ok(())
    }
    fn set_dirty_tracking(&mut self, _: bool) -> Result<(), BackendError> {
        Ok(())
    }
    fn read_dirty(
        &mut self,
        iova: u64,
        len: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> Result<(), BackendError> {
        let mut d = self.dirty.lock().unwrap();
        let first = ((iova - IOVA) >> 12) as usize;
        let pages = (len >> 12) as usize;
        // Whole words only here: windows and mappings are 64-page aligned in this workload.
        let (w0, nw) = (first / 64, pages.div_ceil(64));
        for (o, s) in bitmap.iter_mut().zip(&mut d[w0..w0 + nw]) {
            *o |= *s;
            if clear {
                *s = 0;
            }
        }
        Ok(())
    }
}

/// A 1 GiB guest, all of it mapped at IOVA 1 TiB -> GPA 0 in `map_pages`-page mappings.
fn setup(map_pages: u64) -> (Viommu, Arc<Mutex<Vec<u64>>>) {
    let mut v = Viommu::new(ViommuConfig {
        guest_ram: vec![(0, GIB)],
        metadata_budget: 1 << 32,
        ..Default::default()
    });
    let dirty = Arc::new(Mutex::new(vec![0u64; (PAGES / 64) as usize]));
    let b = v
        .add_backend(Box::new(BitmapDevice {
            dirty: dirty.clone(),
        }))
        .unwrap();
    v.add_endpoint(8, Some(b), &[]).unwrap();
    let send = |v: &mut Viommu, r: &[u8]| {
        v.process(&[Request {
            readable: r,
            readable_len: r.len(),
            writable_len: 4,
        }]);
    };
    send(&mut v, &attach(1, 8, 0));
    let rw = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    let mut p = 0;
    while p < PAGES {
        let r = map(
            1,
            IOVA + (p << 12),
            IOVA + ((p + map_pages) << 12) - 1,
            p << 12,
            rw,
        );
        send(&mut v, &r);
        p += map_pages;
    }
    v.start_dirty_tracking();
    (v, dirty)
}

/// 1% of the pages dirty, spread out (every 100th page).
fn dirty_one_percent(d: &Mutex<Vec<u64>>) {
    let mut d = d.lock().unwrap();
    for p in (0..PAGES).step_by(100) {
        d[(p / 64) as usize] |= 1 << (p % 64);
    }
}

/// The naive harvest: every IOVA bit looked at, every dirty page translated on its own.
fn naive(table: &IoPageTable, dev: &Mutex<Vec<u64>>, out: &mut DirtyBitmap) {
    let mut d = dev.lock().unwrap();
    for p in 0..PAGES {
        let (w, b) = ((p / 64) as usize, p % 64);
        if d[w] & (1 << b) != 0 {
            d[w] &= !(1 << b);
            if let Some(pte) = table.get((IOVA >> 12) + p) {
                out.mark(pte.gpa_page, 1);
            }
        }
    }
}

fn time(mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn benches(c: &mut Criterion) {
    let ram = [(0, GIB)];
    for (label, map_pages) in [("4 KiB mappings", 1u64), ("2 MiB mappings", 512)] {
        let (mut v, dev) = setup(map_pages);
        let mut table = IoPageTable::new(1 << 32);
        let mut p = 0;
        while p < PAGES {
            table
                .map(
                    (IOVA >> 12) + p,
                    (IOVA >> 12) + p + map_pages - 1,
                    p,
                    Perm::RW,
                )
                .unwrap();
            p += map_pages;
        }
        let ours = time(|| {
            dirty_one_percent(&dev);
            let mut out = DirtyBitmap::new(&ram);
            v.harvest_dirty(&mut out);
            assert_eq!(out.count(), PAGES.div_ceil(100));
        });
        let base = time(|| {
            dirty_one_percent(&dev);
            let mut out = DirtyBitmap::new(&ram);
            naive(&table, &dev, &mut out);
            assert_eq!(out.count(), PAGES.div_ceil(100));
        });
        println!(
            "harvest of a 1 GiB guest, 1% dirty, {label}: ours {:.2} ms/GiB, naive per-page \
             {:.2} ms/GiB, ratio {:.1}x",
            ours * 1e3,
            base * 1e3,
            base / ours
        );
        let mut g = c.benchmark_group(format!("harvest 1 GiB, {label}"));
        g.sample_size(10);
        g.bench_function("ours", |b| {
            b.iter_batched(
                || dirty_one_percent(&dev),
                |()| {
                    let mut out = DirtyBitmap::new(&ram);
                    v.harvest_dirty(&mut out);
                    black_box(out.count())
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function("naive", |b| {
            b.iter_batched(
                || dirty_one_percent(&dev),
                |()| {
                    let mut out = DirtyBitmap::new(&ram);
                    naive(&table, &dev, &mut out);
                    black_box(out.count())
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(dirty, benches);
criterion_main!(dirty);
