//! The engine's KV cache: one slot per stored unrolled layer (prelude layers, core iterations ×
//! core layers, coda layers, as a [`Strategy`] compresses them), each a pre-allocated
//! `[B, H, capacity, d]` pair of tensors written in place and grown in blocks, with a validity
//! flag per position. A token that exited early has no entry in the deeper slots, so a later
//! query reads such a position from the slot the strategy picks, or not at all (masked);
//! writing a position again replaces its entry, and rollback only clears flags.

use std::collections::BTreeMap;

use model::burn::prelude::*;
use model::{Attend, Huginn, HuginnConfig, KvCache, LayerSlot};

use crate::strategy::{Layout, Lookup, Strategy};

/// Positions added at a time when a slot grows.
pub(crate) const BLOCK: usize = 64;

/// Keys, values and which positions hold an entry, for one slot. A clone shares its tensors
/// until either side writes (a write to a shared tensor copies it first).
#[derive(Clone)]
struct Slot {
    /// `[B, H, capacity, d]` keys and values. Held in an `Option` so that writes can take
    /// them by value: a tensor with no other owner is updated in place, not copied.
    stored: Option<(Tensor<4>, Tensor<4>)>,
    valid: Vec<bool>,
}

impl Slot {
    fn new(like: &Tensor<4>) -> Self {
        let [b, h, _, d] = like.dims();
        let empty = || Tensor::zeros([b, h, 0, d], &like.device());
        Self {
            stored: Some((empty(), empty())),
            valid: Vec::new(),
        }
    }

    fn keys(&self) -> &Tensor<4> {
        &self.stored.as_ref().expect("a slot holds its tensors").0
    }

    fn values(&self) -> &Tensor<4> {
        &self.stored.as_ref().expect("a slot holds its tensors").1
    }

    /// Replaces keys and values by `f` of them, handing `f` the only reference.
    fn map(&mut self, f: impl Fn(Tensor<4>) -> Tensor<4>) {
        let (keys, values) = self.stored.take().expect("a slot holds its tensors");
        self.stored = Some((f(keys), f(values)));
    }

    fn capacity(&self) -> usize {
        self.valid.len()
    }

    /// Makes room for positions `..len` (in whole blocks of `block`), keeping what is stored.
    fn reserve(&mut self, len: usize, block: usize) {
        if len <= self.capacity() {
            return;
        }
        let capacity = len.div_ceil(block) * block;
        let [b, h, old, d] = self.keys().dims();
        let device = self.keys().device();
        self.map(|t| Tensor::zeros([b, h, capacity, d], &device).slice_assign([0..b, 0..h, 0..old, 0..d], t));
        self.valid.resize(capacity, false);
    }

    /// Writes `keys` and `values` `[B, H, S, d]` at positions `start..start + S`.
    fn write(&mut self, start: usize, keys: Tensor<4>, values: Tensor<4>, block: usize) {
        let [b, h, len, d] = keys.dims();
        self.reserve(start + len, block);
        let range = [0..b, 0..h, start..start + len, 0..d];
        let (stored_keys, stored_values) = self.stored.take().expect("a slot holds its tensors");
        self.stored = Some((
            stored_keys.slice_assign(range.clone(), keys),
            stored_values.slice_assign(range, values),
        ));
        self.valid[start..start + len].fill(true);
    }
}

/// Entries per (stored slot σ, position), read through a [`Strategy`].
#[derive(Clone)]
pub struct StrategyCache {
    strategy: Strategy,
    layout: Layout,
    /// Position of the first token of the chunk being run.
    start: usize,
    /// Left padding of each row: columns before it hold no token and are never attended to.
    pads: Vec<usize>,
    slots: BTreeMap<i64, Slot>,
    /// Positions a slot grows by.
    block: usize,
}

impl StrategyCache {
    pub fn new(strategy: Strategy, model: &Huginn) -> Self {
        let config = model.config();
        Self {
            block: BLOCK,
            strategy,
            layout: Layout {
                prelude: config.n_layers_in_prelude,
                core: config.n_layers_in_recurrent_block,
            },
            start: 0,
            pads: Vec::new(),
            slots: BTreeMap::new(),
        }
    }

    /// A cache whose slots grow by `block` positions: what is read must not depend on it.
    #[cfg(test)]
    pub(crate) fn with_block(strategy: Strategy, model: &Huginn, block: usize) -> Self {
        Self {
            block,
            ..Self::new(strategy, model)
        }
    }

    /// Sets the position of the chunk the next calls belong to.
    pub fn at(&mut self, start: usize) {
        self.start = start;
    }

    /// Declares the rows' left padding (columns to hide from every query of the row).
    pub fn pad(&mut self, pads: Vec<usize>) {
        self.pads = pads;
    }

    /// The rows' left padding (empty: none).
    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    /// Forgets every entry at position `len` or later (rollback after speculation).
    pub fn truncate(&mut self, len: usize) {
        for slot in self.slots.values_mut() {
            for valid in slot.valid.iter_mut().skip(len) {
                *valid = false;
            }
        }
    }

    /// Keeps only the batch rows `keep` (in that order), freeing the others' entries: a
    /// sequence that has ended leaves the batch.
    pub fn retain_rows(&mut self, keep: &[usize]) {
        if !self.pads.is_empty() {
            self.pads = keep.iter().map(|&b| self.pads[b]).collect();
        }
        for slot in self.slots.values_mut() {
            let index = row_index(keep, &slot.keys().device());
            slot.map(|t| t.select(0, index.clone()));
        }
    }

    /// Bytes held by the stored keys and values.
    pub fn bytes(&self) -> usize {
        self.slots
            .values()
            .map(|s| 2 * s.keys().dims().iter().product::<usize>() * s.keys().dtype().size())
            .sum()
    }
}

/// Bytes of keys and values one position takes in a row's cache after `steps` iterations
/// with `strategy`: one entry per distinct stored slot, `element_bytes` per number.
pub fn bytes_per_position(strategy: Strategy, model: &HuginnConfig, steps: usize, element_bytes: usize) -> usize {
    let layout = Layout {
        prelude: model.n_layers_in_prelude,
        core: model.n_layers_in_recurrent_block,
    };
    let mut slots: Vec<i64> = (0..(layout.prelude + layout.core * steps) as i64)
        .map(|sigma| strategy.compress(sigma, layout))
        .collect();
    slots.sort_unstable();
    slots.dedup();
    (slots.len() + model.n_layers_in_coda) * 2 * model.n_embd * element_bytes
}

/// Bytes of one float of `device` (its configured float type).
pub fn float_bytes(device: &Device) -> usize {
    Tensor::<1>::zeros([1], device).dtype().size()
}

/// Batch rows as an index tensor for `select`.
pub fn row_index(rows: &[usize], device: &Device) -> Tensor<1, Int> {
    let rows: Vec<i64> = rows.iter().map(|&b| b as i64).collect();
    let len = rows.len();
    Tensor::from_data(TensorData::new(rows, [len]), device)
}

impl KvCache for StrategyCache {
    fn update(&mut self, slot: LayerSlot, keys: Tensor<4>, values: Tensor<4>) -> Attend {
        let sigma = self
            .strategy
            .compress(slot.reference_index(self.layout.prelude, self.layout.core), self.layout);
        let [b, _, len, _] = keys.dims();
        let (start, end) = (self.start, self.start + len);
        self.slots
            .entry(sigma)
            .or_insert_with(|| Slot::new(&keys))
            .write(start, keys, values, self.block);
        // The common case, checked first without building any list: σ holds every position
        // so far and no row is padded, so the chunk attends causally to all of them.
        let own = &self.slots[&sigma];
        let padded = self.pads.iter().any(|p| *p > 0);
        if !padded && own.valid[..end].iter().all(|&v| v) {
            return Attend {
                keys: own.keys().clone().narrow(2, 0, end),
                values: own.values().clone().narrow(2, 0, end),
                mask: None,
            };
        }
        // A lookup that reads σ alone (and leaves out positions without it) needs no gathering:
        // σ's columns as they are, those without an entry hidden.
        if self.reads_only(sigma) {
            let readable = &own.valid[..end];
            let mask = (padded || readable.contains(&false))
                .then(|| mask(&self.pads, b, start, len, readable, &own.keys().device()));
            return Attend {
                keys: own.keys().clone().narrow(2, 0, end),
                values: own.values().clone().narrow(2, 0, end),
                mask,
            };
        }
        // The positions seen so far: every one has a first-layer entry.
        let seen: Vec<usize> = match self.slots.get(&0) {
            Some(first) => (0..end).filter(|&p| first.valid[p]).collect(),
            None => (start..end).collect(),
        };
        // As the reference: when every position has σ, σ is read as is; the strategy decides
        // only for positions that lack it (this matters for `always-last`).
        let complete = seen.iter().all(|&p| own.valid[p]);
        let (keys, values, read) = if complete {
            let keys = own.keys().clone().narrow(2, 0, end);
            let values = own.values().clone().narrow(2, 0, end);
            (keys, values, seen.iter().map(|&p| Some(p)).collect::<Vec<_>>())
        } else {
            self.gather(sigma, &seen, end)
        };
        // Columns that are not read (never written, or left out by the strategy) and each
        // row's padding are hidden; without either, the chunk is the latest positions and the
        // attention's bottom-right causal masking is right.
        let holes = read.len() < end || read.iter().any(Option::is_none);
        let mask = (holes || padded).then(|| {
            let mut readable = vec![false; end];
            for p in read.iter().flatten() {
                readable[*p] = true;
            }
            mask(&self.pads, b, start, len, &readable, &keys.device())
        });
        Attend { keys, values, mask }
    }
}

impl StrategyCache {
    /// Whether a query at σ reads only σ's own entries under this strategy (see
    /// [`Strategy::lookup`]): the coda always, `full` and `skip` everywhere, `available` in the
    /// prelude.
    fn reads_only(&self, sigma: i64) -> bool {
        sigma < 0
            || matches!(self.strategy.lookup, Lookup::Full | Lookup::Skip)
            || (self.strategy.lookup == Lookup::AvailableM && sigma < self.layout.prelude as i64)
    }

    /// Keys and values at columns `..end` when some seen positions lack σ: then the strategy
    /// picks the slot of every position (`always-last` may pick a later one even where σ is
    /// there), or leaves it out. Returns, per seen position, the position if it is read.
    fn gather(&self, sigma: i64, seen: &[usize], end: usize) -> (Tensor<4>, Tensor<4>, Vec<Option<usize>>) {
        let mut picks: BTreeMap<i64, Vec<bool>> = BTreeMap::new();
        let mut read = Vec::with_capacity(seen.len());
        for &p in seen {
            let has: Vec<i64> = self
                .slots
                .iter()
                .filter(|(_, s)| s.valid.get(p).copied().unwrap_or(false))
                .map(|(sigma, _)| *sigma)
                .collect();
            let from = self.strategy.lookup(sigma, &has, self.layout);
            if let Some(from) = from {
                picks.entry(from).or_insert_with(|| vec![false; end])[p] = true;
            }
            read.push(from.map(|_| p));
        }
        let own = &self.slots[&sigma];
        let [b, h, _, d] = own.keys().dims();
        let device = own.keys().device();
        let mut keys = Tensor::zeros([b, h, end, d], &device);
        let mut values = Tensor::zeros([b, h, end, d], &device);
        for (from, mut columns) in picks {
            // A slot holds only the positions written to it, and grows in blocks as they come:
            // one written last by earlier, deeper-iterated positions can end before `end`. Every
            // column picked from it lies below its capacity (it holds an entry there).
            let source = &self.slots[&from];
            let n = source.capacity().min(end);
            debug_assert!(!columns[n..].contains(&true), "picked where the slot holds no entry");
            columns.truncate(n);
            let take = Tensor::<1, Bool>::from_data(TensorData::new(columns, [n]), &device)
                .reshape([1, 1, n, 1])
                .expand([b, h, n, d]);
            let picked = |all: Tensor<4>, stored: &Tensor<4>| {
                let head = all
                    .clone()
                    .narrow(2, 0, n)
                    .mask_where(take.clone(), stored.clone().narrow(2, 0, n));
                all.slice_assign([0..b, 0..h, 0..n, 0..d], head)
            };
            keys = picked(keys, source.keys());
            values = picked(values, source.values());
        }
        (keys, values, read)
    }
}

/// `[B, 1, S, T]`, true = hidden: causal over columns, unreadable columns hidden, and a row's
/// padding columns hidden from all its queries (a padding query sees only itself, so nothing
/// divides by zero).
fn mask(pads: &[usize], batch: usize, start: usize, len: usize, readable: &[bool], device: &Device) -> Tensor<4, Bool> {
    let columns = readable.len();
    let mut hidden = Vec::with_capacity(batch * len * columns);
    for b in 0..batch {
        let pad = pads.get(b).copied().unwrap_or(0);
        for q in start..start + len {
            hidden.extend((0..columns).map(|k| k > q || !readable[k] || (k < pad && k != q)));
        }
    }
    Tensor::from_data(TensorData::new(hidden, [batch, 1, len, columns]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::HuginnConfig;

    fn host(t: Tensor<4>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// Chunks written past the first block come back in order; rollback forgets positions;
    /// rows leave with their entries.
    #[test]
    fn slots_grow_in_place_roll_back_and_drop_rows() {
        let device = Device::flex();
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&device, 1);
        let mut cache = StrategyCache::new(Strategy::default(), &model);
        let chunk = |start: usize, len: usize| {
            let data: Vec<f32> = (0..2 * 4 * len * 8).map(|i| (start * 1000 + i) as f32).collect();
            Tensor::<4>::from_data(TensorData::new(data, [2, 4, len, 8]), &device)
        };
        let mut written = Vec::new();
        let mut start = 0;
        for len in [50, 1, 30, 1, 1] {
            cache.at(start);
            let keys = chunk(start, len);
            written.push(keys.clone());
            let attend = cache.update(LayerSlot::Prelude(0), keys.clone(), keys);
            start += len;
            assert_eq!(attend.keys.dims(), [2, 4, start, 8]);
            assert!(attend.mask.is_none(), "complete and unpadded: causal");
            assert_eq!(host(attend.keys), host(Tensor::cat(written.clone(), 2)));
        }
        assert_eq!(cache.slots[&0].capacity(), 128);
        // Roll back to 60 positions and write position 60 again.
        cache.truncate(60);
        cache.at(60);
        let again = chunk(7, 1);
        let attend = cache.update(LayerSlot::Prelude(0), again.clone(), again.clone());
        assert_eq!(attend.keys.dims()[2], 61);
        let tail = host(attend.keys.clone().narrow(2, 60, 1));
        assert_eq!(tail, host(again));
        // Row 1 alone stays.
        cache.retain_rows(&[1]);
        cache.at(61);
        let one = chunk(9, 1).narrow(0, 1, 1);
        let attend = cache.update(LayerSlot::Prelude(0), one.clone(), one);
        assert_eq!(attend.keys.dims(), [1, 4, 62, 8]);
        let first = host(attend.keys.narrow(2, 0, 1));
        assert_eq!(first, host(written[0].clone().narrow(0, 1, 1).narrow(2, 0, 1)));
    }

    /// A position that lacks the queried slot is read from the slot the strategy picks, or
    /// hidden by the mask when it picks none.
    #[test]
    fn missing_entries_follow_the_strategy() {
        let device = Device::flex();
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&device, 1);
        let ones = |v: f32, len: usize| Tensor::<4>::full([1, 1, len, 2], v, &device);
        let core = |iteration| LayerSlot::Core { iteration, layer: 0 };
        for (name, want) in [("full", None), ("latest-m4", Some(3.0))] {
            let mut cache = StrategyCache::new(name.parse().unwrap(), &model);
            // Position 0 reaches iteration 1; position 1 only iteration 0.
            cache.at(0);
            cache.update(LayerSlot::Prelude(0), ones(0.0, 1), ones(0.0, 1));
            cache.update(core(0), ones(2.0, 1), ones(2.0, 1));
            cache.update(core(1), ones(3.0, 1), ones(3.0, 1));
            cache.at(1);
            cache.update(LayerSlot::Prelude(0), ones(0.0, 1), ones(0.0, 1));
            cache.update(core(0), ones(5.0, 1), ones(5.0, 1));
            // Position 2 at iteration 2: positions 0 and 1 have no entry there.
            cache.at(2);
            cache.update(LayerSlot::Prelude(0), ones(0.0, 1), ones(0.0, 1));
            let attend = cache.update(core(2), ones(7.0, 1), ones(7.0, 1));
            let keys = host(attend.keys);
            let hidden: Option<Vec<bool>> = attend.mask.map(|m| m.into_data().try_to_vec().unwrap());
            match want {
                // `full`: positions without the slot are left out.
                None => assert_eq!(hidden, Some(vec![true, true, false]), "{name}"),
                // latest-m4 (two core layers here: "m2"): position 0's latest entry of the
                // same core layer is iteration 1's; position 1 has iteration 0's. All are
                // read, so plain causal attention.
                Some(v) => {
                    assert_eq!(hidden, None, "{name}");
                    assert_eq!(keys[..2], [v, v], "{name}");
                    assert_eq!(keys[2..4], [5.0, 5.0], "{name}");
                }
            }
            assert_eq!(keys[4..], [7.0, 7.0], "{name}");
        }
    }
}
