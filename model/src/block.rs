//! The "sandwich" block every layer of the model uses (prelude, core and coda alike):
//! `x̂ = norm_2(x + attn(norm_1(x)))`, `x' = norm_4(x̂ + mlp(norm_3(x̂)))`. Its output is
//! always RMS-normalised, which keeps the iterated state bounded.

use burn::prelude::*;

use crate::attention::{CausalSelfAttention, RowPass};
use crate::cache::{KvCache, LayerSlot};
use crate::mlp::GatedMlp;
use crate::norm::RmsNorm;
use crate::probe;
use crate::rope::Rotary;

#[derive(Module, Debug)]
pub struct SandwichBlock {
    pub norm_1: RmsNorm,
    pub attn: CausalSelfAttention,
    pub norm_2: RmsNorm,
    pub norm_3: RmsNorm,
    pub mlp: GatedMlp,
    pub norm_4: RmsNorm,
}

impl SandwichBlock {
    pub fn forward(&self, x: Tensor<3>, rotary: &Rotary, slot: LayerSlot, cache: &mut dyn KvCache) -> Tensor<3> {
        self.forward_attending(x, |attn, x| attn.forward(x, rotary, slot, cache))
    }

    /// The block over independent sequences stacked along the batch, row `b` at unrolled layer
    /// `slot(b)` (see [`CausalSelfAttention::forward_rows`]).
    pub fn forward_rows(
        &self,
        x: Tensor<3>,
        rows: &mut [RowPass<'_>],
        slot: impl Fn(usize) -> LayerSlot + Sync,
    ) -> Tensor<3> {
        self.forward_attending(x, |attn, x| attn.forward_rows(x, rows, slot))
    }

    fn forward_attending(
        &self,
        x: Tensor<3>,
        attend: impl FnOnce(&CausalSelfAttention, Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        let attended = attend(&self.attn, self.norm_1.forward(x.clone()));
        probe::note("attention output", &attended);
        let summed = x + attended;
        probe::note("residual + attention", &summed);
        let x = self.norm_2.forward(summed);
        let mixed = self.mlp.forward(self.norm_3.forward(x.clone()));
        probe::note("MLP output", &mixed);
        let summed = x + mixed;
        probe::note("residual + MLP", &summed);
        self.norm_4.forward(summed)
    }
}
