//! The vhost-user net device's side of a live migration: the back end's dirty logging
//! turned on and off on the live link (`SET_LOG_BASE`, `VHOST_F_LOG_ALL`,
//! `VHOST_VRING_F_LOG`), the log harvested by GPA, the rings stopped with `GET_VRING_BASE`
//! for the stop-and-copy and started again when the migration fails.

use iommu::dirty::DirtyBitmap;

use vhost::VhostBackend;

use super::{cut, step, LinkState, LogFault, Shared, VhostUserError, LOG_ALL};

impl Shared {
    /// Starts (`on`) or stops the back end's dirty logging on the live link: the log
    /// cleared and handed over (`SET_LOG_BASE`), `VHOST_F_LOG_ALL` in `SET_FEATURES`, and
    /// every started ring's `SET_VRING_ADDR` again with (or without) `VHOST_VRING_F_LOG`.
    /// DPDK accepts both on running rings (QEMU does the same when a migration starts).
    /// A later connection is started with logging as it stands.
    ///
    /// Returns whether the device's writes are tracked: false when the back end cannot log
    /// (no `LOG_SHMFD` or `LOG_ALL`) or a message failed (the back end is then cut off).
    pub(in crate::virtio::net) fn set_logging(&self, on: bool) -> bool {
        let mut st = self.lock();
        st.logging = on;
        st.log_lost = false;
        if on {
            self.log.clear();
        }
        let LinkState {
            link,
            plan,
            stopped,
            log_lost,
            ..
        } = &mut *st;
        // Nothing connected or started writes; a back end that comes is started as asked.
        let (Some(link), Some(plan)) = (link.as_mut(), plan.as_ref()) else {
            return true;
        };
        if !link.can_log {
            *log_lost = on;
            return !on;
        }
        let r = (|| {
            if on {
                self.send_log_base(link)?;
            }
            let features = plan.features | if on { LOG_ALL } else { 0 };
            step("SET_FEATURES", link.frontend.set_features(features))?;
            for r in &plan.rings {
                if stopped.is_some() {
                    break;
                }
                let config = self.ring_config(link, r, on)?;
                step(
                    "SET_VRING_ADDR",
                    link.frontend.set_vring_addr(r.index, &config),
                )?;
            }
            Ok::<_, VhostUserError>(())
        })();
        match r {
            Ok(()) => true,
            Err(e) => {
                log::error!(
                    "{}: cannot turn dirty logging {}: {e}; cutting the back end off",
                    self.label,
                    if on { "on" } else { "off" }
                );
                cut(link);
                *log_lost = on;
                !on
            }
        }
    }

    /// ORs into `out` the pages the back end logged since the last harvest; all of RAM when
    /// logging was lost. Returns the pages logged.
    pub(in crate::virtio::net) fn harvest_log(
        &self,
        ram: &[(u64, u64)],
        out: &mut DirtyBitmap,
    ) -> u64 {
        let lost = self.lock().log_lost;
        if lost {
            for &(gpa, len) in ram {
                out.mark(gpa / 4096, len / 4096);
            }
            return ram.iter().map(|r| r.1 / 4096).sum();
        }
        if self.log_fault == LogFault::Ignore {
            return 0;
        }
        self.log.harvest(out)
    }

    /// Stops every started ring for a migration (`GET_VRING_BASE`: the back end stops
    /// processing it and returns where it stands), recording the bases. Without a back end
    /// nothing runs and nothing is recorded.
    ///
    /// # Errors
    /// A ring that did not stop (the back end is cut off: it writes nothing any more).
    pub(in crate::virtio::net) fn stop_for_migration(&self) -> Result<(), VhostUserError> {
        let mut st = self.lock();
        let LinkState {
            link,
            plan,
            stopped,
            ..
        } = &mut *st;
        let mut bases = Vec::new();
        if let (Some(link), Some(plan)) = (link.as_mut(), plan.as_ref()) {
            for r in &plan.rings {
                // A split ring's index is 16 bits: a larger base is a malformed reply.
                let got = link.frontend.get_vring_base(r.index).and_then(|b| {
                    u16::try_from(b).map_err(|_| {
                        vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::InvalidMessage)
                    })
                });
                match got {
                    Ok(b) => bases.push((r.index, b)),
                    Err(e) => {
                        cut(link);
                        *stopped = Some(bases);
                        return Err(VhostUserError::Protocol("GET_VRING_BASE", e));
                    }
                }
            }
        }
        *stopped = Some(bases);
        Ok(())
    }

    /// The bases of the rings [`Shared::stop_for_migration`] stopped.
    pub(in crate::virtio::net) fn stopped_bases(&self) -> Option<Vec<(usize, u16)>> {
        self.lock().stopped.clone()
    }

    /// Starts the rings a migration stopped again from their bases (the migration failed
    /// or was a snapshot). A back end that refuses is cut off.
    pub(in crate::virtio::net) fn restart_after_migration(&self) {
        let mut st = self.lock();
        let logging = st.logging;
        let LinkState {
            link,
            plan,
            stopped,
            ..
        } = &mut *st;
        let Some(bases) = stopped.take() else {
            return;
        };
        let (Some(link), Some(plan)) = (link.as_mut(), plan.as_ref()) else {
            return;
        };
        for (i, base) in bases {
            let Some(r) = plan.rings.iter().find(|r| r.index == i) else {
                continue;
            };
            if let Err(e) = self.start_ring(link, plan, r, base, logging) {
                log::error!(
                    "{}: cannot restart ring {i} after the migration: {e}",
                    self.label
                );
                cut(link);
                return;
            }
        }
    }
}
