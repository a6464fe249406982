//! virtio-iommu protocol and state, the page-granular I/O page table and dirty bitmaps.
