//! Attention over what a cache holds: which keys each query sees ([`mask`]), where positions
//! rotate ([`rotary`]), grouped-query attention and its split-keys parts ([`gqa`]), and a
//! prompt's attention in blocks of queries ([`plan`]).

pub(crate) mod gqa;
pub(crate) mod mask;
pub(crate) mod plan;
pub(crate) mod rotary;
