//! Queue processing of the virtio-iommu: requests in batches, fault events.

use virtio_queue::QueueT;
use zerocopy::IntoBytes;

use super::VirtioIommu;
use crate::virtio::Chain;
use iommu::protocol::ReqTail;
use iommu::viommu::{Reply, Request, MAX_READABLE};

impl VirtioIommu {
    /// Handles every request queued since the last notification as one batch, writes the
    /// replies, and signals the guest once.
    pub fn process_requests(&mut self) {
        let mem = self.mem.clone();
        let Some(queue) = self.queues.get_mut(0) else {
            return;
        };
        let mut chains = Vec::new();
        while let Some(c) = queue.pop_descriptor_chain(mem.as_ref()) {
            chains.push(Chain::from_desc_chain(c));
            if chains.len() > usize::from(super::QUEUE_SIZE) {
                break;
            }
        }
        if chains.is_empty() {
            return;
        }
        // Read what each request says; an unreadable one is answered as unparsable.
        let readable: Vec<Option<Vec<u8>>> = chains
            .iter()
            .map(|c| c.read_prefix(mem.as_ref(), MAX_READABLE).ok())
            .collect();
        let empty = Vec::new();
        let reqs: Vec<Request> = chains
            .iter()
            .zip(&readable)
            .map(|(c, r)| Request {
                readable: r.as_ref().unwrap_or(&empty),
                readable_len: if r.is_some() {
                    usize::try_from(c.readable_len()).unwrap_or(usize::MAX)
                } else {
                    0
                },
                writable_len: usize::try_from(c.writable_len()).unwrap_or(0),
            })
            .collect();
        let replies = self.iommu.lock().process(&reqs);
        let queue = &mut self.queues[0];
        for (c, reply) in chains.iter().zip(replies) {
            let used = match reply {
                Reply::Unwritten => 0,
                Reply::Written {
                    status,
                    props,
                    tail_offset,
                    used_len,
                } => {
                    let tail = ReqTail {
                        status: status as u8,
                        reserved: [0; 3],
                    };
                    let ok = (props.is_empty() || c.write_at(mem.as_ref(), 0, &props).is_ok())
                        && c.write_at(mem.as_ref(), tail_offset as u64, tail.as_bytes())
                            .is_ok();
                    if ok {
                        used_len
                    } else {
                        self.bad_chains += 1;
                        0
                    }
                }
            };
            if queue.add_used(mem.as_ref(), c.head, used).is_err() {
                self.bad_chains += 1;
            }
        }
        let notify = queue.needs_notification(mem.as_ref()).unwrap_or(true);
        if notify {
            if let Some(i) = &self.interrupt {
                i.signal_queue(0);
            }
        }
        // Requests may have been answered while faults were waiting for buffers.
        self.deliver_faults();
    }

    /// Writes waiting fault events into the event queue's buffers. When the queue has no
    /// buffer the events wait (up to a bound; older ones are then dropped and counted).
    pub fn deliver_faults(&mut self) {
        let mem = self.mem.clone();
        let Some(queue) = self.queues.get_mut(1) else {
            return;
        };
        let mut used_any = false;
        loop {
            let Some(fault) = self.iommu.lock().pop_fault() else {
                break;
            };
            let Some(chain) = queue.pop_descriptor_chain(mem.as_ref()) else {
                self.iommu.lock().unpop_fault(fault);
                break;
            };
            let c = Chain::from_desc_chain(chain);
            let bytes = fault.as_bytes();
            // 5.13.6.7: a buffer too small for the report is not combined with others.
            let used = if c.writable_len() >= bytes.len() as u64
                && c.write_at(mem.as_ref(), 0, bytes).is_ok()
            {
                bytes.len() as u32
            } else {
                self.bad_chains += 1;
                0
            };
            if queue.add_used(mem.as_ref(), c.head, used).is_err() {
                self.bad_chains += 1;
            }
            used_any = true;
        }
        if used_any && queue.needs_notification(mem.as_ref()).unwrap_or(true) {
            if let Some(i) = &self.interrupt {
                i.signal_queue(1);
            }
        }
    }
}
