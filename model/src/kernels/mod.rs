//! The CPU engine: the model's operations fused into one pass each on Burn's Flex backend.
//!
//! The model's definition (the modules at the crate's top level) is written once with Burn
//! tensor operations and runs as written on every backend. burn-flex 0.22 runs each of those
//! operations as its own single-threaded pass with a fresh output, so a norm, a gate or an
//! attention layer composed of ten of them leaves the second core idle and streams its tensors
//! ten times. The operations here do the same arithmetic in one parallel, vectorised pass
//! forward and one backward. Nothing here changes what the model computes: each operation has
//! a test comparing its fast path with the composition it replaces.
//!
//! # A fused operation
//!
//! One file per operation ([`linear`], [`quantized_linear`], [`matmul`], [`gate`], [`rms_norm`], [`cross_entropy`],
//! [`causal_attention`], [`cached_attention`], [`chunk_attention`]), holding:
//!
//! 1. a backend-extension trait (`#[backend_extension(Flex, Autodiff)]`), whose default body is
//!    the composed version written with backend operations where the trait has one;
//! 2. the entry point the definition calls, on `Tensor`s: it checks where the fast path applies
//!    (a Flex device, the dtypes and shapes the kernel takes) and dispatches through the trait,
//!    or runs the composed version, the plain Burn tensor operations every other backend uses;
//! 3. `impl … for Flex`: the kernel;
//! 4. `impl … for Autodiff<B, C>`: one recorded operation whose backward runs kernels of the
//!    inner backend (a second trait, `…Backward` or `…Kernels`, or the operation itself), or
//!    the trait's default where gradients never reach the operation;
//! 5. its tests, fast path against composed version.
//!
//! [`chunk_attention`] is the one exception: its composed default is the attention layer's own
//! tensor path, [`crate::attention::CausalSelfAttention::forward`] with a cache, which stays in
//! the definition.
//!
//! Beside the operations, what they share: [`flex`] (telling a Flex device apart, reading a
//! tensor's rows as f32, parallel row chunks), [`simd`] (loops compiled for the widest SIMD the
//! CPU has, a vectorisable `exp`), [`matmul`]'s strided `gemm` calls, [`threads`] (the calling
//! thread in rayon's pool, its workers kept awake) and [`heap`] (the allocator's settings for
//! the batch binaries).
//!
//! # A kernel for another backend
//!
//! A wgpu (or CUDA) kernel goes in the operation's file beside the Flex one: list the backend in
//! the trait's `#[backend_extension(...)]` (Burn's selector for the CubeCL runtimes is
//! `Cube: cfg(feature = "wgpu")`), implement the trait for it, and widen the entry point's
//! check, today `runs_on_flex`. A CubeCL kernel too long for that file becomes a submodule of
//! the operation (`kernels/<operation>/cube.rs`). A backend the attribute does not list never
//! reaches the trait: its entry point takes the composed path.

pub mod cached_attention;
pub mod causal_attention;
pub mod chunk_attention;
pub mod cross_entropy;
pub mod flex;
pub mod gate;
pub mod heap;
pub mod linear;
pub mod matmul;
pub mod quantized_linear;
pub mod rms_norm;
pub mod simd;
pub mod threads;
