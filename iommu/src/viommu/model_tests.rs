//! Property tests: random sequences of ATTACH/DETACH/MAP/UNMAP/translate against a simple
//! reference model (a `BTreeMap` of whole mappings per domain, written straight from the
//! spec's text) give the same statuses and translations, and the host backend holds exactly
//! what the endpoint may reach.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::tests::{attach, detach, map, unmap};
use super::*;
use crate::backend::RecordingBackend;
use crate::pagetable::Perm;
use crate::protocol::*;

const PAGE: u64 = 4096;
/// Endpoints: 1 and 2 emulated, 8 with a recording backend, 5 unknown.
const EPS: [u32; 4] = [1, 2, 8, 5];
/// Guest RAM of the model: 64 pages at GPA 0.
const RAM_PAGES: u64 = 64;

#[derive(Debug, Clone)]
enum Op {
    Attach {
        dom: u32,
        ep: u32,
        bypass: bool,
    },
    Detach {
        dom: u32,
        ep: u32,
    },
    Map {
        dom: u32,
        page: u64,
        pages: u64,
        gpa: u64,
        perm: u32,
    },
    Unmap {
        dom: u32,
        first: u64,
        last: u64,
    },
    Translate {
        ep: u32,
        page: u64,
        write: bool,
    },
    Bypass(bool),
}

fn op() -> impl Strategy<Value = Op> {
    let dom = 0u32..4;
    let ep = prop::sample::select(EPS.to_vec());
    prop_oneof![
        3 => (dom.clone(), ep.clone(), prop::bool::weighted(0.15))
            .prop_map(|(dom, ep, bypass)| Op::Attach { dom, ep, bypass }),
        1 => (dom.clone(), ep.clone()).prop_map(|(dom, ep)| Op::Detach { dom, ep }),
        6 => (dom.clone(), 0u64..48, 1u64..6, 0u64..RAM_PAGES, 1u32..4)
            .prop_map(|(dom, page, pages, gpa, perm)| Op::Map { dom, page, pages, gpa, perm }),
        3 => (dom.clone(), 0u64..50, 0u64..8)
            .prop_map(|(dom, first, n)| Op::Unmap { dom, first, last: first + n }),
        4 => (ep, 0u64..56, any::<bool>()).prop_map(|(ep, page, write)| Op::Translate { ep, page, write }),
        1 => any::<bool>().prop_map(Op::Bypass),
    ]
}

#[derive(Default, Debug)]
struct ModelDomain {
    bypass: bool,
    /// first page -> (last page, first gpa page, perm bits)
    maps: BTreeMap<u64, (u64, u64, u32)>,
    endpoints: BTreeSet<u32>,
}

#[derive(Default, Debug)]
struct Model {
    bypass: bool,
    ep_domain: BTreeMap<u32, u32>,
    domains: BTreeMap<u32, ModelDomain>,
}

impl Model {
    fn known(ep: u32) -> bool {
        ep != 5
    }

    fn leave(&mut self, ep: u32) {
        if let Some(d) = self.ep_domain.remove(&ep) {
            let dm = self.domains.get_mut(&d).unwrap();
            dm.endpoints.remove(&ep);
            if dm.endpoints.is_empty() {
                self.domains.remove(&d);
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Option<Status> {
        Some(match *op {
            Op::Attach { dom, ep, bypass } => {
                if !Self::known(ep) {
                    Status::NoEnt
                } else if self.domains.get(&dom).is_some_and(|d| d.bypass != bypass) {
                    Status::Inval
                } else if self.ep_domain.get(&ep) == Some(&dom) {
                    Status::Ok
                } else {
                    self.leave(ep);
                    let d = self.domains.entry(dom).or_insert_with(|| ModelDomain {
                        bypass,
                        ..Default::default()
                    });
                    d.endpoints.insert(ep);
                    self.ep_domain.insert(ep, dom);
                    Status::Ok
                }
            }
            Op::Detach { dom, ep } => {
                if !Self::known(ep) {
                    Status::NoEnt
                } else if self.ep_domain.get(&ep) != Some(&dom) {
                    Status::Inval
                } else {
                    self.leave(ep);
                    Status::Ok
                }
            }
            Op::Map {
                dom,
                page,
                pages,
                gpa,
                perm,
            } => {
                let Some(d) = self.domains.get_mut(&dom) else {
                    return Some(Status::NoEnt);
                };
                if d.bypass {
                    return Some(Status::Inval);
                }
                let last = page + pages - 1;
                let overlap = d.maps.iter().any(|(&s, &(e, _, _))| s <= last && page <= e);
                if overlap {
                    return Some(Status::Inval);
                }
                d.maps.insert(page, (last, gpa, perm));
                Status::Ok
            }
            Op::Unmap { dom, first, last } => {
                let Some(d) = self.domains.get_mut(&dom) else {
                    return Some(Status::NoEnt);
                };
                if d.bypass {
                    return Some(Status::Inval);
                }
                let touched: Vec<(u64, u64)> = d
                    .maps
                    .iter()
                    .filter(|(&s, &(e, _, _))| s <= last && first <= e)
                    .map(|(&s, &(e, _, _))| (s, e))
                    .collect();
                if touched.iter().any(|&(s, e)| s < first || e > last) {
                    return Some(Status::Range);
                }
                for (s, _) in touched {
                    d.maps.remove(&s);
                }
                Status::Ok
            }
            Op::Translate { .. } | Op::Bypass(_) => return None,
        })
    }

    /// The GPA page and permission endpoint `ep` reaches at IOVA page `page`:
    /// `Err(reason)` when it faults.
    fn translate(&self, ep: u32, page: u64, write: bool) -> Result<u64, u8> {
        if !Self::known(ep) {
            return Err(VIRTIO_IOMMU_FAULT_R_UNKNOWN);
        }
        let Some(d) = self.ep_domain.get(&ep).map(|d| &self.domains[d]) else {
            return if self.bypass {
                Ok(page)
            } else {
                Err(VIRTIO_IOMMU_FAULT_R_DOMAIN)
            };
        };
        if d.bypass {
            return Ok(page);
        }
        for (&s, &(e, gpa, perm)) in &d.maps {
            if s <= page && page <= e {
                let need = if write {
                    VIRTIO_IOMMU_MAP_F_WRITE
                } else {
                    VIRTIO_IOMMU_MAP_F_READ
                };
                return if perm & need != 0 {
                    Ok(gpa + page - s)
                } else {
                    Err(VIRTIO_IOMMU_FAULT_R_MAPPING)
                };
            }
        }
        Err(VIRTIO_IOMMU_FAULT_R_MAPPING)
    }

    /// What endpoint 8's host backend must hold: IOVA page -> (GPA page, perm).
    fn host_view(&self) -> BTreeMap<u64, (u64, Perm)> {
        let mut v = BTreeMap::new();
        let identity = |v: &mut BTreeMap<u64, (u64, Perm)>| {
            for p in 0..RAM_PAGES {
                v.insert(p, (p, Perm::RW));
            }
        };
        match self.ep_domain.get(&8).map(|d| &self.domains[d]) {
            None if self.bypass => identity(&mut v),
            None => {}
            Some(d) if d.bypass => identity(&mut v),
            Some(d) => {
                for (&s, &(e, gpa, perm)) in &d.maps {
                    for p in s..=e {
                        v.insert(p, (gpa + p - s, Perm::from_bits(perm).unwrap()));
                    }
                }
            }
        }
        v
    }
}

fn request(op: &Op) -> Option<Vec<u8>> {
    Some(match *op {
        Op::Attach { dom, ep, bypass } => attach(dom, ep, u32::from(bypass)),
        Op::Detach { dom, ep } => detach(dom, ep),
        Op::Map {
            dom,
            page,
            pages,
            gpa,
            perm,
        } => map(
            dom,
            page * PAGE,
            (page + pages) * PAGE - 1,
            gpa * PAGE,
            perm,
        ),
        Op::Unmap { dom, first, last } => unmap(dom, first * PAGE, (last + 1) * PAGE - 1),
        Op::Translate { .. } | Op::Bypass(_) => return None,
    })
}

fn run(ops: &[Op], batch_size: usize, merge: bool) -> Result<(), TestCaseError> {
    let mut v = Viommu::new(ViommuConfig {
        guest_ram: vec![(0, RAM_PAGES * PAGE)],
        ..Default::default()
    });
    v.add_endpoint(1, None, &[]).unwrap();
    v.add_endpoint(2, None, &[]).unwrap();
    let caps = BackendCaps {
        merge_maps: merge,
        merge_unmaps: merge,
        ..Default::default()
    };
    let (b, log) = RecordingBackend::new("model", caps);
    let id = v.add_backend(Box::new(b)).unwrap();
    v.add_endpoint(8, Some(id), &[]).unwrap();
    let mut model = Model::default();

    // Consecutive requests go in one batch of up to `batch_size`; translations and bypass
    // changes end a batch.
    let mut i = 0;
    while i < ops.len() {
        let mut reqs = Vec::new();
        let mut expected = Vec::new();
        while i < ops.len() && reqs.len() < batch_size {
            let Some(r) = request(&ops[i]) else { break };
            expected.push(model.apply(&ops[i]));
            reqs.push((r, ops[i].clone()));
            i += 1;
        }
        if !reqs.is_empty() {
            let rs: Vec<Request> = reqs
                .iter()
                .map(|(r, _)| Request {
                    readable: r,
                    readable_len: r.len(),
                    writable_len: 4,
                })
                .collect();
            let got: Vec<Option<Status>> = v.process(&rs).iter().map(|r| r.status()).collect();
            for ((g, e), (_, op)) in got.iter().zip(&expected).zip(&reqs) {
                prop_assert_eq!(g, e, "{:?}", op);
            }
            prop_assert_eq!(log.lock().unwrap().pages.clone(), model.host_view());
            continue;
        }
        match ops[i] {
            Op::Translate { ep, page, write } => {
                let access = if write { Access::Write } else { Access::Read };
                let mut out = Vec::new();
                let got = v
                    .translate(ep, page * PAGE + 8, 16, access, &mut out)
                    .map(|()| out[0].0 / PAGE)
                    .map_err(|f| f.reason);
                prop_assert_eq!(got, model.translate(ep, page, write), "{:?}", ops[i]);
            }
            Op::Bypass(on) => {
                v.set_bypass(u8::from(on));
                model.bypass = on;
                prop_assert_eq!(log.lock().unwrap().pages.clone(), model.host_view());
            }
            _ => unreachable!(),
        }
        i += 1;
    }
    for (d, dm) in &model.domains {
        let got: Vec<(u64, u64)> = v
            .domain_mappings(*d)
            .iter()
            .map(|m| (m.0 / PAGE, m.2 / PAGE))
            .collect();
        let want: Vec<(u64, u64)> = dm
            .maps
            .iter()
            .map(|(&s, &(e, _, _))| (s, e - s + 1))
            .collect();
        prop_assert_eq!(got, want);
    }
    prop_assert_eq!(
        v.domain_ids(),
        model.domains.keys().copied().collect::<Vec<_>>()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::testing::cases(400), ..ProptestConfig::default() })]

    #[test]
    fn device_matches_model_one_request_per_batch(ops in prop::collection::vec(op(), 1..120)) {
        run(&ops, 1, false)?;
    }

    #[test]
    fn device_matches_model_in_batches(ops in prop::collection::vec(op(), 1..120), n in 2usize..16) {
        run(&ops, n, false)?;
    }

    #[test]
    fn device_matches_model_with_merging_backend(ops in prop::collection::vec(op(), 1..120), n in 1usize..16) {
        run(&ops, n, true)?;
    }
}

/// The page table alone against a map of pages, with huge-entry-sized mappings.
mod table {
    use super::*;
    use crate::pagetable::IoPageTable;

    #[derive(Debug, Clone)]
    enum TOp {
        Map(u64, u64, u64),
        Unmap(u64, u64),
    }

    fn top() -> impl Strategy<Value = TOp> {
        // Pages around a few 2 MiB boundaries, sizes up to 3 chunks.
        // Offsets and sizes favour 2 MiB alignment so that huge entries are exercised.
        let offset = prop_oneof![Just(0u64), Just(1), Just(511), 0u64..600];
        let page = (0u64..6, offset).prop_map(|(c, o)| c * 512 + o);
        let size = prop_oneof![Just(512u64), Just(1024), Just(1025), Just(511), 1u64..1600];
        prop_oneof![
            (
                page.clone(),
                size.clone(),
                prop::sample::select(vec![0u64, 512, 1024, 7])
            )
                .prop_map(|(p, n, g)| TOp::Map(p, n, g)),
            (page, size).prop_map(|(p, n)| TOp::Unmap(p, p + n - 1)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: crate::testing::cases(300), ..ProptestConfig::default() })]
        #[test]
        fn table_matches_page_map(ops in prop::collection::vec(top(), 1..40)) {
            let mut t = IoPageTable::default();
            // page -> (gpa, start, end)
            let mut m: BTreeMap<u64, (u64, bool, bool)> = BTreeMap::new();
            for op in &ops {
                match *op {
                    TOp::Map(p, n, g) => {
                        let free = (p..p + n).all(|q| !m.contains_key(&q));
                        let r = t.map(p, p + n - 1, g, Perm::RW);
                        prop_assert_eq!(r.is_ok(), free);
                        if free {
                            for q in p..p + n {
                                m.insert(q, (g + q - p, q == p, q == p + n - 1));
                            }
                        }
                    }
                    TOp::Unmap(f, l) => {
                        let split = m.get(&f).is_some_and(|e| !e.1) || m.get(&l).is_some_and(|e| !e.2);
                        prop_assert_eq!(t.check_unmap(f, l).is_err(), split);
                        if !split {
                            let n = t.remove(f, l, |_| {});
                            let keys: Vec<u64> = m.range(f..=l).map(|(k, _)| *k).collect();
                            prop_assert_eq!(n, keys.len() as u64);
                            for k in keys {
                                m.remove(&k);
                            }
                        }
                    }
                }
                prop_assert_eq!(t.mapped_pages(), m.len() as u64);
            }
            for (&p, &(g, s, e)) in &m {
                let pte = t.get(p).unwrap();
                prop_assert_eq!((pte.gpa_page, pte.start, pte.end), (g, s, e));
            }
            let total: u64 = {
                let mut n = 0;
                t.mappings(0, u64::MAX, |r| { n += r.pages; true });
                n
            };
            prop_assert_eq!(total, m.len() as u64);
            t.remove(0, u64::MAX, |_| {});
            prop_assert!(t.is_empty());
            prop_assert_eq!(t.metadata_bytes(), IoPageTable::default().metadata_bytes());
        }
    }
}

/// Dirty tracking: random guest requests interleaved with device writes and harvests. Every
/// page a device wrote (by the GPA its IOVA pointed to at the time) is in a harvest, however
/// the mappings changed in between; with a tracking backend nothing else is.
mod dirty {
    use super::*;
    use crate::dirty::DirtyBitmap;

    #[derive(Debug, Clone)]
    enum DOp {
        Guest(Op),
        Write(u64),
        Harvest,
    }

    fn dop() -> impl Strategy<Value = DOp> {
        prop_oneof![
            6 => op().prop_filter("requests only", |o| !matches!(o, Op::Translate { .. }))
                .prop_map(DOp::Guest),
            4 => (0u64..56).prop_map(DOp::Write),
            1 => Just(DOp::Harvest),
        ]
    }

    fn run_dirty(ops: &[DOp], tracking: bool, merge: bool) -> Result<(), TestCaseError> {
        let ram = vec![(0, RAM_PAGES * PAGE)];
        let mut v = Viommu::new(ViommuConfig {
            guest_ram: ram.clone(),
            ..Default::default()
        });
        let caps = BackendCaps {
            dirty_tracking: tracking,
            merge_maps: merge,
            merge_unmaps: merge,
            ..Default::default()
        };
        let (b, log) = RecordingBackend::new("dirty", caps);
        let id = v.add_backend(Box::new(b)).unwrap();
        v.add_endpoint(8, Some(id), &[]).unwrap();
        let report = v.start_dirty_tracking();
        prop_assert_eq!(report.tracked.len(), usize::from(tracking));
        let mut harvested = DirtyBitmap::new(&ram);
        let mut written = BTreeSet::new();
        for o in ops {
            match o {
                DOp::Guest(Op::Bypass(on)) => v.set_bypass(u8::from(*on)),
                DOp::Guest(g) => {
                    let r = request(g).unwrap();
                    v.process(&[Request {
                        readable: &r,
                        readable_len: r.len(),
                        writable_len: 4,
                    }]);
                }
                DOp::Write(page) => {
                    // Writes outside guest RAM (the guest may map any GPA) are not RAM's.
                    if let Some(gpa) = log.lock().unwrap().device_write(*page) {
                        if gpa < RAM_PAGES {
                            written.insert(gpa);
                        }
                    }
                }
                DOp::Harvest => v.harvest_dirty(&mut harvested),
            }
        }
        harvested.merge(&v.stop_dirty_tracking().unwrap());
        for &g in &written {
            prop_assert!(harvested.is_dirty(g), "device write to GPA page {} lost", g);
        }
        if tracking {
            prop_assert_eq!(harvested.count(), written.len() as u64);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: crate::testing::cases(300), ..ProptestConfig::default() })]

        #[test]
        fn no_device_write_is_lost(ops in prop::collection::vec(dop(), 1..150), merge in any::<bool>()) {
            run_dirty(&ops, true, merge)?;
        }

        #[test]
        fn untracked_backends_count_every_writable_page(ops in prop::collection::vec(dop(), 1..150)) {
            run_dirty(&ops, false, false)?;
        }
    }
}
