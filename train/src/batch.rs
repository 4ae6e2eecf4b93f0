//! Turning generated task examples into tensors, and scoring a model on them.
//!
//! Exact match is scored with teacher forcing: a row is right when the argmax at every answer
//! position is the answer token. That equals greedy decoding of the answer (the first wrong
//! argmax is where greedy decoding would go wrong too), in one forward pass per batch.

use burn::prelude::*;
use model::Huginn;

use crate::addition;
use crate::hops::HopExample;

/// A generated example: its tokens and which of them are answers (the only ones scored).
pub trait TaskExample {
    fn tokens(&self) -> &[u32];
    fn is_answer(&self, i: usize) -> bool;
}

impl TaskExample for addition::Example {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    fn is_answer(&self, i: usize) -> bool {
        i >= self.answer_start
    }
}

impl TaskExample for HopExample {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    fn is_answer(&self, i: usize) -> bool {
        self.answers.contains(&i)
    }
}

/// Inputs `[B, S]` and labels `[B, S]` (`-100` outside answers and on padding).
pub struct Batch {
    pub inputs: Tensor<2, Int>,
    pub labels: Tensor<2, Int>,
}

/// Right-pads the examples with `pad` to a common length and labels only their answers.
pub fn make_batch<E: TaskExample>(examples: &[E], pad: u32, device: &Device) -> Batch {
    let width = examples.iter().map(|e| e.tokens().len() - 1).max().unwrap_or(0);
    let mut inputs = Vec::with_capacity(examples.len() * width);
    let mut labels = Vec::with_capacity(examples.len() * width);
    for e in examples {
        let t = e.tokens();
        for i in 0..width {
            inputs.push(t.get(i).copied().unwrap_or(pad) as i64);
            let target = i + 1;
            labels.push(if target < t.len() && e.is_answer(target) {
                t[target] as i64
            } else {
                -100
            });
        }
    }
    let shape = [examples.len(), width];
    Batch {
        inputs: Tensor::from_data(TensorData::new(inputs, shape), device),
        labels: Tensor::from_data(TensorData::new(labels, shape), device),
    }
}

/// Fraction of rows whose every answer token is the model's argmax after `depth` recurrence
/// steps (from a zero initial state).
pub fn exact_match(model: &Huginn, batch: &Batch, depth: usize) -> f64 {
    let predicted = model
        .forward(batch.inputs.clone(), depth)
        .logits
        .argmax(2)
        .squeeze_dim::<2>(2);
    let labels = batch.labels.clone();
    let scored = labels.clone().not_equal_elem(-100);
    // A position is wrong when it is scored and the prediction differs.
    let wrong = predicted.not_equal(labels).bool_and(scored).int().sum_dim(1);
    let rows = wrong.dims()[0];
    let right = wrong.equal_elem(0).int().sum().into_scalar::<i64>();
    right as f64 / rows as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::HuginnConfig;

    #[test]
    fn batches_label_only_answers_and_scoring_matches_a_direct_check() {
        let device = Device::flex();
        let task = addition::AdditionTask {
            seed: 1,
            max_digits: 3,
            padded: false,
        };
        let examples: Vec<_> = (0..16).map(|i| task.example(addition::Split::Train, i)).collect();
        let batch = make_batch(&examples, addition::PAD, &device);
        let labels: Vec<i64> = batch.labels.to_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        let width = batch.inputs.dims()[1];
        for (row, e) in examples.iter().enumerate() {
            let scored: Vec<i64> = labels[row * width..(row + 1) * width]
                .iter()
                .copied()
                .filter(|l| *l >= 0)
                .collect();
            let answer: Vec<i64> = e.tokens[e.answer_start..].iter().map(|t| *t as i64).collect();
            assert_eq!(scored, answer);
        }
        let model = HuginnConfig::tiny(addition::VOCAB_SIZE, 16, 2, (1, 1, 1)).init(&device, 4);
        let score = exact_match(&model, &batch, 2);
        // The same score from host-side argmaxes.
        let logits = model.forward(batch.inputs.clone(), 2).logits;
        let values: Vec<f32> = logits.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let v = addition::VOCAB_SIZE;
        let best = |row: usize, i: usize| {
            let at = &values[(row * width + i) * v..(row * width + i + 1) * v];
            (0..v).max_by(|a, b| at[*a].total_cmp(&at[*b])).unwrap() as i64
        };
        let right = |labels: &[i64]| {
            (0..examples.len())
                .filter(|row| {
                    (0..width).all(|i| labels[row * width + i] < 0 || best(*row, i) == labels[row * width + i])
                })
                .count() as f64
                / examples.len() as f64
        };
        assert_eq!(score, right(&labels));
        // Even rows relabelled with the model's own predictions: at least half are right.
        let mut relabelled = labels.clone();
        for row in (0..examples.len()).step_by(2) {
            for i in 0..width {
                if relabelled[row * width + i] >= 0 {
                    relabelled[row * width + i] = best(row, i);
                }
            }
        }
        let batch = Batch {
            inputs: batch.inputs,
            labels: Tensor::from_data(TensorData::new(relabelled.clone(), [examples.len(), width]), &device),
        };
        let score = exact_match(&model, &batch, 2);
        assert!(score >= 0.5 && score == right(&relabelled), "{score}");
    }
}
