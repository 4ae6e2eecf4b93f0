//! The interface between attention and a key/value cache.
//!
//! A recurrent-depth model unrolls its core many times, so a cache has one slot per UNROLLED
//! layer: each prelude layer, each (core iteration, core layer) pair, each coda layer. The model
//! names the slot of every attention call with a [`LayerSlot`]; what a cache stores, shares
//! between iterations, or returns for positions that exited early is the cache's business (the
//! inference crate implements the reference's strategies). [`FullCache`] here is the simple
//! complete cache: every slot keeps every position.

use std::collections::HashMap;

use burn::prelude::*;

/// The unrolled layer an attention call belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerSlot {
    Prelude(usize),
    Core { iteration: usize, layer: usize },
    Coda(usize),
}

impl LayerSlot {
    /// The reference's `step_idx` for this slot: prelude layer `l` → `l`; core layer `j` of
    /// iteration `i` → `l_P + l_R·i + j`; coda layer `l` → `−(l+1)`.
    pub fn reference_index(self, prelude_layers: usize, core_layers: usize) -> i64 {
        match self {
            Self::Prelude(l) => l as i64,
            Self::Core { iteration, layer } => (prelude_layers + core_layers * iteration + layer) as i64,
            Self::Coda(l) => -(l as i64) - 1,
        }
    }
}

/// What the queries of a chunk attend to.
pub struct Attend {
    /// `[B, H, T, d]`.
    pub keys: Tensor<4>,
    /// `[B, H, T, d]`.
    pub values: Tensor<4>,
    /// `[B, 1 or H, S, T]`, `true` = hidden. `None` means the chunk's `S` queries are the last
    /// `S` of the `T` keys and attend causally (bottom-right aligned).
    pub mask: Option<Tensor<4, Bool>>,
}

/// A key/value store the attention layers write to and read from.
pub trait KvCache {
    /// Stores the keys and values `[B, H, S, d]` of the current chunk for `slot` and returns
    /// what the chunk attends to.
    fn update(&mut self, slot: LayerSlot, keys: Tensor<4>, values: Tensor<4>) -> Attend;

    /// Whether [`KvCache::update`] keeps anything: where it does not, a chunk attends to itself
    /// only, and attention may skip making keys and values in the cache's layout.
    fn stores(&self) -> bool {
        true
    }
}

/// No cache: each chunk attends to itself only.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCache;

impl KvCache for NoCache {
    fn update(&mut self, _slot: LayerSlot, keys: Tensor<4>, values: Tensor<4>) -> Attend {
        Attend {
            keys,
            values,
            mask: None,
        }
    }

    fn stores(&self) -> bool {
        false
    }
}

/// Every slot keeps every position it has seen (the reference's `full` strategy when no
/// position ever exits early). Appends by concatenation: simple, exact, not for long decoding.
#[derive(Debug, Default)]
pub struct FullCache {
    entries: HashMap<LayerSlot, (Tensor<4>, Tensor<4>)>,
}

impl FullCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions stored in `slot`.
    pub fn len(&self, slot: LayerSlot) -> usize {
        self.entries.get(&slot).map_or(0, |(k, _)| k.dims()[2])
    }
}

impl KvCache for FullCache {
    fn update(&mut self, slot: LayerSlot, keys: Tensor<4>, values: Tensor<4>) -> Attend {
        let (keys, values) = match self.entries.remove(&slot) {
            Some((k, v)) => (Tensor::cat(vec![k, keys], 2), Tensor::cat(vec![v, values], 2)),
            None => (keys, values),
        };
        self.entries.insert(slot, (keys.clone(), values.clone()));
        Attend {
            keys,
            values,
            mask: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_indices_of_the_2_4_2_layout() {
        let idx = |s: LayerSlot| s.reference_index(2, 4);
        assert_eq!(idx(LayerSlot::Prelude(1)), 1);
        assert_eq!(idx(LayerSlot::Core { iteration: 0, layer: 0 }), 2);
        assert_eq!(idx(LayerSlot::Core { iteration: 3, layer: 2 }), 2 + 12 + 2);
        assert_eq!(idx(LayerSlot::Coda(0)), -1);
        assert_eq!(idx(LayerSlot::Coda(1)), -2);
    }
}
