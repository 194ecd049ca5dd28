//! The cache kinds and the one vocabulary they answer ([`kv_cache`]): dense
//! ([`dynamic`], [`static_cache`]), windowed ([`sliding`], [`sink`], sharing [`windowed`]),
//! quantized ([`quantized`]), paged ([`paged`]: a block pool, block tables and a cache on
//! them); [`any`] to choose one at run time, [`kind`] to name and parse
//! them, [`model_cache`] for one per layer, [`buffer`] for the preallocated storage the dense
//! and windowed kinds write in place, and [`view`] for what an update hands attention.

pub(crate) mod any;
pub(crate) mod buffer;
pub(crate) mod dynamic;
pub(crate) mod kind;
pub(crate) mod kv_cache;
pub(crate) mod model_cache;
pub(crate) mod paged;
pub(crate) mod quantized;
pub(crate) mod sink;
pub(crate) mod sliding;
pub(crate) mod static_cache;
pub(crate) mod view;
pub(crate) mod windowed;
