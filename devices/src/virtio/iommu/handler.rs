//! Queue processing of the virtio-iommu: requests in batches, fault events. Chains are read
//! with `virtio-queue`'s `Reader` and written with its `Writer`.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sync::MutexExt;
use virtio_queue::{QueueT, Reader, Writer};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::IntoBytes;

use super::{IommuHandle, Requests, VirtioIommu};
use crate::GuestMemoryMmap;
use iommu::protocol::ReqTail;
use iommu::viommu::{HostSide, Reply, Request, MAX_READABLE};

/// The request thread's loop: serves the queue at each notification (`kick`) until `stop` is
/// signalled. While `frozen` is set, a notification is consumed and its requests stay queued
/// (the thaw notifies again). Faults waiting after a batch are handed to the event loop.
pub(super) fn serve(
    requests: &Mutex<Requests>,
    iommu: &IommuHandle,
    mem: &Arc<GuestMemoryMmap>,
    kick: &EventFd,
    stop: &EventFd,
    frozen: &AtomicBool,
) {
    use std::os::fd::AsRawFd;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd structures for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!(
                "virtio-iommu: the request thread cannot wait: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let _ = kick.read();
        if frozen.load(Ordering::Acquire) {
            continue;
        }
        process(&mut requests.locked(), iommu, mem);
        if iommu.lock().has_faults() {
            iommu.notify_fault();
        }
    }
}

/// Handles every request queued since the last notification as one batch, writes the
/// replies, and signals the guest once.
pub(super) fn process(r: &mut Requests, iommu: &IommuHandle, mem: &Arc<GuestMemoryMmap>) {
    let m = mem.as_ref();
    let Requests {
        queue,
        interrupt,
        bad_chains,
        replies: kept,
    } = r;
    let Some(queue) = queue.as_mut() else {
        return;
    };
    // Per chain: head, the first bytes of the readable part (None when it cannot be
    // read), its length, and a writer over the writable part (None when it is not all in
    // guest memory: such a request has nowhere to put its tail).
    // The bytes are read into a fixed buffer per chain: no allocation per request.
    let mut chains = Vec::new();
    while let Some(c) = queue.pop_descriptor_chain(m) {
        let head = c.head_index();
        let readable = Reader::new(m, c.clone()).ok().and_then(|mut r| {
            let len = r.available_bytes();
            let n = len.min(MAX_READABLE);
            let mut buf = [0u8; MAX_READABLE];
            r.read_exact(&mut buf[..n]).ok().map(|()| (buf, n, len))
        });
        let writer = Writer::new(m, c).ok();
        if writer.is_none() {
            bad_chains.fetch_add(1, Ordering::Relaxed);
        }
        chains.push((head, readable, writer));
        if chains.len() > usize::from(super::QUEUE_SIZE) {
            break;
        }
    }
    if chains.is_empty() {
        return;
    }
    let reqs: Vec<Request> = chains
        .iter()
        .map(|(_, r, w)| Request {
            readable: r.as_ref().map_or(&[][..], |(b, n, _)| &b[..*n]),
            readable_len: r.as_ref().map_or(0, |(_, _, len)| *len),
            writable_len: w.as_ref().map_or(0, |w| w.available_bytes()),
        })
        .collect();
    let mut replies = std::mem::take(kept);
    iommu
        .lock_for_host_calls()
        .process_into(&reqs, &mut replies);
    for ((head, _, writer), reply) in chains.into_iter().zip(replies.drain(..)) {
        let used = match (reply, writer) {
            (
                Reply::Written {
                    status,
                    props,
                    tail_offset,
                    used_len,
                },
                Some(mut w),
            ) => {
                let tail = ReqTail {
                    status: status as u8,
                    reserved: [0; 3],
                };
                let ok = w.split_at(tail_offset).is_ok_and(|mut t| {
                    w.write_all(&props).is_ok() && t.write_all(tail.as_bytes()).is_ok()
                });
                if ok {
                    used_len
                } else {
                    bad_chains.fetch_add(1, Ordering::Relaxed);
                    0
                }
            }
            _ => 0,
        };
        if queue.add_used(m, head, used).is_err() {
            bad_chains.fetch_add(1, Ordering::Relaxed);
        }
    }
    *kept = replies;
    let notify = queue.needs_notification(m).unwrap_or(true);
    if notify {
        if let Some(i) = interrupt.as_ref() {
            i.signal_queue(0);
        }
    }
}

impl VirtioIommu {
    /// Writes waiting fault events into the event queue's buffers. When the queue has no
    /// buffer the events wait (up to a bound; older ones are then dropped and counted).
    pub fn deliver_faults(&mut self) {
        let mem = self.mem.clone();
        let m = mem.as_ref();
        let Some(queue) = self.events.as_mut() else {
            return;
        };
        let mut used_any = false;
        loop {
            let Some(fault) = self.iommu.lock().pop_fault() else {
                break;
            };
            let Some(chain) = queue.pop_descriptor_chain(m) else {
                self.iommu.lock().unpop_fault(fault);
                break;
            };
            let head = chain.head_index();
            let bytes = fault.as_bytes();
            // 5.13.6.7: a buffer too small for the report is not combined with others.
            let written = Writer::new(m, chain).is_ok_and(|mut w| {
                w.available_bytes() >= bytes.len() && w.write_all(bytes).is_ok()
            });
            let used = if written {
                bytes.len() as u32
            } else {
                self.bad_event_chains += 1;
                0
            };
            if queue.add_used(m, head, used).is_err() {
                self.bad_event_chains += 1;
            }
            used_any = true;
        }
        if used_any && queue.needs_notification(m).unwrap_or(true) {
            if let Some(i) = &self.interrupt {
                i.signal_queue(1);
            }
        }
    }
}
