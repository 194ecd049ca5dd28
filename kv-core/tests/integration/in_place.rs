//! Cache writes happen in place on burn-flex, the default CPU backend: appending a token writes
//! its slot, it does not copy the buffer. burn-flex 0.21.0 as published copied the whole
//! destination on every `slice_assign`; the workspace patches it (vendor/burn-flex), and these
//! tests fail if that patch is lost.

use burn::tensor::{Tensor, TensorPrimitive};
use burn_flex::{Flex, FlexDevice};
use kv_core::{
    DynamicCache, KvCache, PagedCache, PagedCacheConfig, StaticCache, StaticCacheConfig,
};

type B = Flex;

/// Where a tensor's storage starts (views share their buffer's address).
fn storage_address(t: &Tensor<B, 4>) -> usize {
    match t.clone().into_primitive() {
        TensorPrimitive::Float(flex) => flex.bytes().as_ptr() as usize,
        TensorPrimitive::QFloat(_) => unreachable!("float tensors"),
    }
}

fn token(value: f32) -> Tensor<B, 4> {
    Tensor::full([1, 2, 1, 8], value, &FlexDevice)
}

#[test]
fn slice_assign_writes_a_sole_handle_in_place() {
    let buffer = Tensor::<B, 4>::zeros([1, 2, 64, 8], &FlexDevice);
    let before = storage_address(&buffer);
    let buffer = buffer.slice_assign([0..1, 0..2, 5..6, 0..8], token(1.0));
    assert_eq!(
        storage_address(&buffer),
        before,
        "the write copied the buffer"
    );
    let row: Vec<f32> = buffer
        .slice([0..1, 0..1, 5..6, 0..8])
        .into_data()
        .to_vec()
        .unwrap();
    assert_eq!(row, vec![1.0; 8]);
}

#[test]
fn a_shared_buffer_is_still_copied_on_write() {
    let buffer = Tensor::<B, 4>::zeros([1, 2, 64, 8], &FlexDevice);
    let kept = buffer.clone();
    let written = buffer.slice_assign([0..1, 0..2, 0..1, 0..8], token(1.0));
    assert_ne!(storage_address(&written), storage_address(&kept));
    let old: Vec<f32> = kept
        .slice([0..1, 0..1, 0..1, 0..8])
        .into_data()
        .to_vec()
        .unwrap();
    assert_eq!(old, vec![0.0; 8], "the other handle must not see the write");
}

#[test]
fn appending_to_a_dynamic_cache_keeps_its_buffer() {
    let mut cache = DynamicCache::<B>::with_capacity(64);
    cache.update(token(0.0), token(0.0)).unwrap();
    let first = storage_address(&cache.to_tensors().unwrap().0);
    for step in 1..40 {
        // The view each update returns is dropped before the next write, as a model does.
        let view = cache
            .update(token(step as f32), token(step as f32))
            .unwrap();
        assert_eq!(view.keys.dims(), [1, 2, step + 1, 8]);
        drop(view);
        assert_eq!(
            storage_address(&cache.to_tensors().unwrap().0),
            first,
            "step {step} copied the buffer"
        );
    }
}

#[test]
fn appending_to_a_static_cache_keeps_its_buffer() {
    let config = StaticCacheConfig {
        max_batch: 1,
        max_len: 32,
        kv_heads: 2,
        head_dim: 8,
    };
    let mut cache = StaticCache::<B>::new(config, &FlexDevice).unwrap();
    let address = |cache: &mut StaticCache<B>, value: f32| {
        let view = cache.update(token(value), token(value)).unwrap();
        storage_address(&view.keys)
    };
    let first = address(&mut cache, 0.0);
    for step in 1..20 {
        assert_eq!(address(&mut cache, step as f32), first, "step {step}");
    }
}

#[test]
fn a_paged_cache_writes_its_pool_in_place() {
    let mut cache = PagedCache::<B>::new(PagedCacheConfig::for_sequences(4, 2, 64));
    cache.update(token(0.0), token(0.0)).unwrap();
    let pool = storage_address(&cache.pool_tensors().unwrap().0);
    // Across blocks: each step's view is dropped before the next write.
    for step in 1..20 {
        let view = cache
            .update(token(step as f32), token(step as f32))
            .unwrap();
        assert_eq!(view.keys.dims(), [1, 2, step + 1, 8]);
        drop(view);
        let now = storage_address(&cache.pool_tensors().unwrap().0);
        assert_eq!(now, pool, "step {step} copied the pool");
    }
    // Two forked rows append to the block they share: one copies it into a block of its own,
    // inside the same pool.
    cache.select_batch(&[0, 0]).unwrap();
    let two = Tensor::<B, 4>::full([2, 2, 1, 8], 9.0, &FlexDevice);
    let view = cache.update(two.clone(), two).unwrap();
    assert_eq!(view.keys.dims(), [2, 2, 21, 8]);
    drop(view);
    assert_eq!(storage_address(&cache.pool_tensors().unwrap().0), pool);
}

#[test]
fn a_view_kept_across_a_paged_write_costs_a_copy_of_the_pool() {
    let mut cache = PagedCache::<B>::new(PagedCacheConfig::for_sequences(4, 1, 64));
    let kept = cache.update(token(1.0), token(1.0)).unwrap();
    let pool = storage_address(&cache.pool_tensors().unwrap().0);
    cache.update(token(2.0), token(2.0)).unwrap();
    // The live view shared the pool, so the write had to copy it (what the model avoids by
    // dropping each layer's view before that layer's next update).
    assert_ne!(storage_address(&cache.pool_tensors().unwrap().0), pool);
    let old: Vec<f32> = kept.keys.into_data().to_vec().unwrap();
    assert_eq!(old, vec![1.0; 16], "the kept view still reads what it read");
}
