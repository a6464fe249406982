//! Passthrough devices added and removed while the guest runs, through ACPI PCI hot-plug
//! (`devices::pci::hotplug`): the slots `--hotplug` kept free, what sits in them, and the
//! API's `add-device` and `remove-device`.
//!
//! Adding: the device is connected and its PCI function built by `build` (the
//! [`Connector`]), given to the vIOMMU as an endpoint (a slot the VIOT names) or with all
//! RAM mapped on it, its event-loop handlers registered, then put on bus 0 and announced
//! to the guest (`PCIU` and the GED's interrupt); the request returns once the guest enabled
//! it (its command register), or at the deadline.
//!
//! Removing: the guest is asked (`PCID`), and its acpiphp unbinds the driver (whose DMA
//! unmaps and the iommu core's DETACH come first) and ejects the slot (`_EJ0`): the function
//! leaves the bus. A guest that does not within the deadline has the function taken off the
//! bus all the same. Then the VMM tears down what is left, in this order: the event-loop
//! handlers, the vIOMMU endpoint (any mapping the guest left is unmapped on the host, its
//! dirty pages harvested first; its domain freed when empty; its backend released), the
//! passthrough device (its direct mappings' dirty pages harvested), the PCI function (its
//! BAR areas out of the guest) and with the last reference the device connection.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::pci::hotplug::PciHotplug;
use event_manager::{RemoteEndpoint, SubscriberId};
use iommu::dirty::DirtyBitmap;
use iommu::viommu::HostSide;
use serde::{Deserialize, Serialize};
use sync::{MutexExt, RwLockExt};

use super::devices::{DeviceManager, Function, Subscriber};
use super::passthrough::Passthrough;
use crate::config::PassthroughConfig;
use crate::error::VmmError;

/// Why a device could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// Not now, or not with these arguments: the text says why (no free slot, an unknown
    /// id, a migration running, no `--hotplug`).
    #[error("{0}")]
    Refused(String),
    /// The device could not be set up or taken down.
    #[error("{0}")]
    Failed(String),
    /// The guest did not eject the device in time; it was removed without the guest.
    #[error("{0}")]
    NotEjected(String),
}

/// How long `add-device` waits for the guest to enable the device, and `remove-device` for
/// the guest to eject it, when the request does not say.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// A device ready to go on the bus, as the [`Connector`] built it.
pub struct Plugged {
    /// Its PCI function (not on the bus yet).
    pub function: Function,
    /// The passthrough device.
    pub passthrough: Passthrough,
    /// Its event-loop handlers (fault reports, page requests, server commands, hang-up).
    pub subscribers: Vec<Subscriber>,
    /// Its endpoint ID in the vIOMMU, behind it.
    pub endpoint: Option<u32>,
    /// The BAR window ranges `(start, size)` it was given, for [`Connector::release`].
    pub bars: Vec<(u64, u64)>,
}

/// A device to add: what `--vfio-user` or `--vfio` take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HotDevice {
    /// A vfio-user server's socket and options.
    VfioUser(PassthroughConfig),
    /// A host PCI device through VFIO.
    Vfio(PassthroughConfig),
}

impl HotDevice {
    /// Its options.
    pub fn config(&self) -> &PassthroughConfig {
        match self {
            HotDevice::VfioUser(c) | HotDevice::Vfio(c) => c,
        }
    }
}

/// Connects a device and builds its function, for a slot of bus 0 (`build`'s side).
pub trait Connector: Send + Sync {
    /// Connects the device `dev` describes and builds it for `slot`: behind the vIOMMU
    /// (`iommu=on`) as endpoint `slot << 3`, else with all RAM mapped on it.
    ///
    /// # Errors
    /// [`VmmError::Device`] naming the device: the server refused or is not there, no room
    /// for its BARs or vectors, a backend that would narrow what the guest was told.
    fn connect(&self, dev: &HotDevice, slot: u8) -> Result<Plugged, VmmError>;

    /// Gives back the BAR window ranges of a device that went away (the guest may have moved
    /// its BARs elsewhere in the window since; the VMM's allocator only keeps the VMM's own
    /// choices apart).
    fn release(&self, bars: &[(u64, u64)]);
}

/// A slot that takes devices while the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotSlot {
    /// Its device number on bus 0.
    pub slot: u8,
    /// The VIOT names it behind the vIOMMU.
    pub behind: bool,
}

/// A device flags put in a hot-plug slot (`slot=N`): its slot, its endpoint behind the
/// vIOMMU, and its event-loop handlers.
pub type AtBoot = (u8, Option<u32>, Vec<Subscriber>);

/// A device in a hot-plug slot.
struct Present {
    id: String,
    slot: u8,
    endpoint: Option<u32>,
    subscribers: Vec<SubscriberId>,
    bars: Vec<(u64, u64)>,
}

/// The hot-plug slots, what is in them, and how to add more.
pub struct Hotplug {
    /// The registers and the GED's interrupt.
    pub controller: Arc<PciHotplug>,
    /// The slots, lowest first.
    pub slots: Vec<HotSlot>,
    connector: Box<dyn Connector>,
    present: Mutex<Vec<Present>>,
    /// Devices given by flags in hot-plug slots (`slot=N`), with their event-loop handlers,
    /// until the event loop takes them ([`Hotplug::start`]).
    at_boot: Mutex<Vec<AtBoot>>,
    /// Adds and removes event-loop handlers; set when the event loop exists.
    events: Mutex<Option<RemoteEndpoint<Subscriber>>>,
    next_id: AtomicU32,
}

impl Hotplug {
    /// Slots `slots` served by `controller`; devices connected by `connector`. `at_boot`:
    /// the devices flags put in hot-plug slots, as `(slot, endpoint, event-loop handlers)`;
    /// they can be removed like hot-added ones.
    pub fn new(
        controller: Arc<PciHotplug>,
        slots: Vec<HotSlot>,
        connector: Box<dyn Connector>,
        at_boot: Vec<AtBoot>,
    ) -> Self {
        Self {
            controller,
            slots,
            connector,
            present: Mutex::new(Vec::new()),
            at_boot: Mutex::new(at_boot),
            events: Mutex::new(None),
            next_id: AtomicU32::new(0),
        }
    }

    /// Registers the handlers of the devices flags put in hot-plug slots with the event loop
    /// `em` (on its thread, before it runs), and keeps its remote endpoint for the devices
    /// added and removed later.
    pub fn start(&self, em: &mut event_manager::EventManager<Subscriber>) {
        use event_manager::SubscriberOps;
        for (slot, endpoint, subs) in std::mem::take(&mut *self.at_boot.locked()) {
            let subscribers = subs.into_iter().map(|s| em.add_subscriber(s)).collect();
            let id = format!("hotplug{}", self.next_id.fetch_add(1, Ordering::Relaxed));
            log::info!(
                "hot-plug: the device in {} (given by flags) is {id}",
                bdf(slot)
            );
            self.present.locked().push(Present {
                id,
                slot,
                endpoint,
                subscribers,
                bars: Vec::new(),
            });
        }
        *self.events.locked() = Some(em.remote_endpoint());
    }

    fn call_event_loop<O: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn event_manager::SubscriberOps<Subscriber = Subscriber>) -> O
            + Send
            + 'static,
    ) -> Result<O, HotplugError> {
        let e = self
            .events
            .locked()
            .clone()
            .ok_or_else(|| HotplugError::Refused("the event loop is not running".into()))?;
        e.call_blocking(move |ops| Ok::<O, event_manager::Error>(f(ops)))
            .map_err(|err| HotplugError::Failed(format!("event loop: {err:?}")))
    }
}

/// What `add-device` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedDevice {
    /// The id `remove-device` takes.
    pub id: String,
    /// `00:SS.0`.
    pub bdf: String,
    /// Behind the vIOMMU.
    pub iommu: bool,
    /// The guest enabled the device (memory decoding or bus mastering) before the request
    /// returned; false when the wait ran out (the device stays, the guest may take it later).
    pub enabled: bool,
    /// From the request to the device on the bus, in milliseconds.
    pub plugged_ms: u64,
    /// From the request to the guest enabling it (or to the deadline), in milliseconds.
    pub enabled_ms: u64,
}

/// What `remove-device` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedDevice {
    /// The id it had.
    pub id: String,
    /// `00:SS.0`.
    pub bdf: String,
    /// The guest ejected it (`_EJ0`). A removal without the guest (the deadline passed) is
    /// answered with [`HotplugError::NotEjected`] instead, so an answer says true.
    pub ejected: bool,
    /// From the request to the slot empty, in milliseconds.
    pub ejected_ms: u64,
    /// Host map and unmap calls its DMA backend made in all.
    pub host_maps: u64,
    /// See `host_maps`.
    pub host_unmaps: u64,
    /// Bytes still mapped on the device server after the teardown (0 unless a call failed).
    pub mapped_bytes_left: u64,
    /// Behind the vIOMMU: the domain it was still attached to when the guest let it go
    /// (the guest's own DETACH normally leaves none).
    pub left_attached: Option<u32>,
    /// Behind the vIOMMU: a domain freed by the removal.
    pub domain_freed: bool,
}

fn bdf(slot: u8) -> String {
    format!("00:{slot:02x}.0")
}

/// One change of devices at a time, never during a snapshot or a migration (`busy` is the
/// machine's lock of those).
fn hotplug_guard<'a>(
    busy: &'a Mutex<()>,
    what: &str,
) -> Result<std::sync::MutexGuard<'a, ()>, HotplugError> {
    busy.try_lock().map_err(|_| {
        HotplugError::Refused(format!(
            "a snapshot, a migration or another device change is running: {what} is refused \
             until it ends"
        ))
    })
}

impl Hotplug {
    /// Adds the passthrough device `dev` describes in a free hot-plug slot (behind the
    /// vIOMMU with `iommu=on`; in its `slot=N` if given), tells the guest, and waits up to
    /// `wait` for it to enable the device. `busy` is the machine's lock of snapshots and
    /// migrations.
    ///
    /// # Errors
    /// [`HotplugError::Refused`] with no free slot of the kind asked, or during a snapshot
    /// or migration; [`HotplugError::Failed`] when the device cannot be connected or set up
    /// (nothing of it stays).
    pub fn add_device(
        &self,
        devices: &DeviceManager,
        busy: &Mutex<()>,
        dev: &HotDevice,
        wait: Duration,
    ) -> Result<AddedDevice, HotplugError> {
        let cfg = dev.config();
        let started = Instant::now();
        let hp = self;
        let _one = hotplug_guard(busy, "add-device")?;
        if cfg.iommu && devices.iommu.is_none() {
            return Err(HotplugError::Refused("iommu=on needs --iommu".into()));
        }
        let slot = {
            let present = hp.present.locked();
            let free =
                |s: &&HotSlot| s.behind == cfg.iommu && !present.iter().any(|p| p.slot == s.slot);
            if let Some(want) = cfg.slot {
                if !hp.slots.iter().filter(free).any(|s| s.slot == want) {
                    return Err(HotplugError::Refused(format!(
                        "slot={want}: not a free hot-plug slot {} the vIOMMU",
                        if cfg.iommu { "behind" } else { "outside" }
                    )));
                }
            }
            hp.slots
                .iter()
                .filter(free)
                .find(|s| cfg.slot.is_none_or(|w| w == s.slot))
                .map(|s| s.slot)
                .ok_or_else(|| {
                    let (kind, flag) = if cfg.iommu {
                        ("behind the vIOMMU", "iommu")
                    } else {
                        ("outside the vIOMMU", "direct")
                    };
                    let n = hp.slots.iter().filter(|s| s.behind == cfg.iommu).count();
                    HotplugError::Refused(format!(
                        "no free hot-plug slot {kind}: {n} in all, all taken (--hotplug {flag}=N)"
                    ))
                })?
        };
        let plugged = hp
            .connector
            .connect(dev, slot)
            .map_err(|e| HotplugError::Failed(e.to_string()))?;
        let Plugged {
            function,
            passthrough,
            subscribers,
            endpoint,
            bars,
        } = plugged;
        let ids = match hp.call_event_loop(move |ops| {
            subscribers
                .into_iter()
                .map(|s| ops.add_subscriber(s))
                .collect::<Vec<_>>()
        }) {
            Ok(ids) => ids,
            Err(e) => {
                self.forget_endpoint(devices, endpoint);
                self.connector.release(&bars);
                return Err(e);
            }
        };
        // Under dirty tracking the new device's writes count from now on.
        if devices.dirty.locked().is_some() {
            if let Some(d) = &passthrough.direct {
                if !d.start() {
                    devices.untracked.locked().push(passthrough.label.clone());
                }
            }
        }
        let device = function.device.clone();
        let label = passthrough.label.clone();
        devices.passthrough.write_locked().push(passthrough);
        {
            let mut f = devices.functions.write_locked();
            f.push(function);
            f.sort_by_key(|f| f.slot);
        }
        let id = format!("hotplug{}", hp.next_id.fetch_add(1, Ordering::Relaxed));
        hp.present.locked().push(Present {
            id: id.clone(),
            slot,
            endpoint,
            subscribers: ids,
            bars,
        });
        if !devices.pci.add_device(usize::from(slot), device.clone()) {
            // Not possible: the slot was free in `present`; undo all the same.
            let _ = self.teardown(devices, &id);
            return Err(HotplugError::Failed(format!(
                "PCI slot {} taken",
                bdf(slot)
            )));
        }
        let plugged_ms = started.elapsed().as_millis() as u64;
        hp.controller.announce_added(slot);
        log::info!("hot-plug: {label} added as {id}; waiting for the guest");
        let deadline = started + wait;
        let enabled = loop {
            // Memory space or bus master enabled: the guest's driver took it.
            if device.locked().config().read_reg(1) & 0x6 != 0 {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let enabled_ms = started.elapsed().as_millis() as u64;
        if enabled {
            log::info!("hot-plug: the guest enabled {id} after {enabled_ms} ms");
        } else {
            log::warn!("hot-plug: the guest did not enable {id} within {wait:?}");
        }
        Ok(AddedDevice {
            id,
            bdf: bdf(slot),
            iommu: cfg.iommu,
            enabled,
            plugged_ms,
            enabled_ms,
        })
    }

    /// Asks the guest to give up hot-added device `id`, waits up to `wait` for its eject,
    /// then tears the device down (without the guest when the wait ran out, which is then
    /// reported as [`HotplugError::NotEjected`], with the teardown's figures).
    ///
    /// # Errors
    /// [`HotplugError::Refused`] for an unknown id, or during a snapshot or migration (nothing
    /// changes); [`HotplugError::NotEjected`] when the guest did not eject it in time (it is
    /// gone all the same).
    pub fn remove_device(
        &self,
        devices: &DeviceManager,
        busy: &Mutex<()>,
        id: &str,
        wait: Duration,
    ) -> Result<RemovedDevice, HotplugError> {
        let started = Instant::now();
        let hp = self;
        let _one = hotplug_guard(busy, "remove-device")?;
        let slot = {
            let present = hp.present.locked();
            let p = present.iter().find(|p| p.id == id).ok_or_else(|| {
                let ids: Vec<&str> = present.iter().map(|p| p.id.as_str()).collect();
                HotplugError::Refused(format!(
                    "no hot-added device `{id}` (present: {})",
                    if ids.is_empty() {
                        "none".to_string()
                    } else {
                        ids.join(", ")
                    }
                ))
            })?;
            p.slot
        };
        hp.controller.request_removal(slot);
        let ejected = hp.controller.wait_ejected(slot, wait);
        if !ejected {
            log::warn!(
                "hot-plug: the guest did not eject {id} ({}) within {wait:?}: taking it off \
                 the bus",
                bdf(slot)
            );
            devices.pci.remove_device(usize::from(slot));
        }
        let ejected_ms = started.elapsed().as_millis() as u64;
        let mut r = self.teardown(devices, id)?;
        r.ejected = ejected;
        r.ejected_ms = ejected_ms;
        log::info!(
            "hot-plug: {id} removed ({}) after {ejected_ms} ms: {} host maps, {} unmaps, {} bytes \
             left",
            if ejected {
                "ejected by the guest"
            } else {
                "without the guest"
            },
            r.host_maps,
            r.host_unmaps,
            r.mapped_bytes_left
        );
        if !ejected {
            // Gone all the same, but the guest may still believe it has the device: the
            // user hears of it as a failure.
            return Err(HotplugError::NotEjected(format!(
                "the guest did not eject {id} ({}) within {wait:?}: the device was taken off \
                 the bus without it and torn down: host_maps={} host_unmaps={} \
                 mapped_bytes_left={}",
                r.bdf, r.host_maps, r.host_unmaps, r.mapped_bytes_left
            )));
        }
        Ok(r)
    }

    /// Removes an endpoint whose device never made it to the bus.
    fn forget_endpoint(&self, devices: &DeviceManager, endpoint: Option<u32>) {
        if let (Some(ep), Some((h, _))) = (endpoint, &devices.iommu) {
            h.lock_for_host_calls().remove_endpoint(ep);
        }
    }

    /// Everything of device `id` but its place on the bus, which is gone already.
    fn teardown(&self, devices: &DeviceManager, id: &str) -> Result<RemovedDevice, HotplugError> {
        let hp = self;
        let present = {
            let mut p = hp.present.locked();
            let i = p
                .iter()
                .position(|p| p.id == id)
                .ok_or_else(|| HotplugError::Refused(format!("no hot-added device `{id}`")))?;
            p.remove(i)
        };
        let slot = present.slot;
        let ids = present.subscribers;
        if let Err(e) = hp.call_event_loop(move |ops| {
            for s in ids {
                let _ = ops.remove_subscriber(s);
            }
        }) {
            log::error!("hot-plug: {id}: cannot remove its event-loop handlers: {e}");
        }
        let mut out = RemovedDevice {
            id: id.to_string(),
            bdf: bdf(slot),
            ejected: false,
            ejected_ms: 0,
            host_maps: 0,
            host_unmaps: 0,
            mapped_bytes_left: 0,
            left_attached: None,
            domain_freed: false,
        };
        if let (Some(ep), Some((h, _))) = (present.endpoint, &devices.iommu) {
            if let Some(r) = h.lock_for_host_calls().remove_endpoint(ep) {
                if let Some(e) = &r.error {
                    log::error!("hot-plug: {id}: endpoint {ep:#x}: {e}");
                }
                out.left_attached = r.was_attached;
                out.domain_freed = r.domain_freed;
            }
        }
        let p = {
            let mut list = devices.passthrough.write_locked();
            list.iter()
                .position(|p| p.slot == slot)
                .map(|i| list.remove(i))
        };
        if let Some(p) = p {
            // A device that could not report its writes is gone: it no longer counts.
            devices.untracked.locked().retain(|l| *l != p.label);
            if let Some(d) = &p.direct {
                // Outside the vIOMMU: what it wrote reaches the next harvest, then its
                // mappings of all RAM go.
                if let Some(acc) = devices.dirty.locked().as_mut() {
                    let mut round = DirtyBitmap::new(&devices.ram_ranges);
                    d.harvest(&devices.ram_ranges, &mut round);
                    acc.merge(&round);
                }
                d.stop();
                d.unmap_all();
            }
            let (maps, unmaps) = *p.dma_calls.locked();
            out.host_maps = maps;
            out.host_unmaps = unmaps;
            out.mapped_bytes_left = p
                .mapped_bytes
                .as_ref()
                .map_or(0, |m| m.load(Ordering::Relaxed));
        }
        let f = {
            let mut list = devices.functions.write_locked();
            list.iter()
                .position(|f| f.slot == slot)
                .map(|i| list.remove(i))
        };
        drop(f);
        hp.connector.release(&present.bars);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    /// A slot's function on bus 0, as `lspci` names it.
    #[test]
    fn a_slot_is_named_as_lspci_names_it() {
        assert_eq!(super::bdf(5), "00:05.0");
        assert_eq!(super::bdf(0x1f), "00:1f.0");
    }
}
