//! `huginn`: the command line for recurrent-depth models.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use folder::ModelFolder;
use folder::chat::{Message, Role};
use infer::adaptive::{self, AdaptiveConfig, AdaptiveGeneration, Decoding, MAX_STEPS};
use infer::cache::float_bytes;
use infer::depths::predictions_by_depth;
use infer::exit::Criterion;
use infer::fixture_report::{Summary, check_dir};
use infer::serve::api::ServerDefaults;
use infer::serve::engine::EngineLimits;
use infer::serve::{App, ConnectionLimits, connections, serve};
use infer::speculative::{self, SpeculativeConfig};
use infer::strategy::Strategy;
use infer::text::TextStream;
use infer::warm_start::WarmStart;
use infer::{limits, range};
use model::burn::prelude::Device;
use model::{Backend, Bits, Huginn, HuginnConfig, InitialState, Precision};

mod chat;
mod decoding;
mod diffusion;
mod eval;

use decoding::DecodingArgs;
use diffusion::{DiffusionArgs, SamplerKind};

#[derive(Parser)]
#[command(
    name = "huginn",
    version,
    about = "Recurrent-depth language models (Huginn-0125 and friends)"
)]
struct Cli {
    /// Compute backend: cpu, wgpu or cuda (those compiled into this binary).
    #[arg(long, global = true, default_value = "cpu")]
    device: Backend,
    /// Float type of the weights and activations: f32, f16 or bf16 (as the device supports).
    #[arg(long, global = true, default_value = "f32")]
    dtype: Precision,
    /// Round a float folder's linear weights to 8 or 4 bits as it loads, one tensor at a time
    /// (a folder written by `huginn quantize` loads as it is stored).
    #[arg(long, global = true)]
    quantize: Option<Bits>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Show the next-token prediction after each recurrence step.
    // `--steps -1` is a bad value of --steps (named in the error), not an unknown flag `-1`.
    #[command(allow_negative_numbers = true)]
    Depths {
        /// Model folder (config.json + safetensors or model.bpk), or ORG/NAME[@REVISION] on the
        /// Hugging Face hub. Without it, a random tiny model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Prompt token ids, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        /// Deepest recurrence to run.
        #[arg(long, default_value_t = 32)]
        max_depth: usize,
        /// Depths to report (default: powers of two up to --max-depth).
        #[arg(long, value_delimiter = ',')]
        depths: Vec<usize>,
        /// Candidates shown per depth.
        #[arg(long, default_value_t = 3)]
        top: usize,
        /// Random initial state from this seed (the reference's like-init) instead of zeros.
        #[arg(long)]
        seed: Option<u64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Generation, each token with up to --steps recurrence steps and an optional per-token
    /// exit criterion. The text (token ids without a tokenizer) streams to stdout, the steps
    /// per token go to stderr. Defaults come from the folder's generation_config.json.
    // `--steps -1` is a bad value of --steps (named in the error), not an unknown flag `-1`.
    #[command(allow_negative_numbers = true)]
    Generate {
        /// Model folder: config.json and weights, optionally tokenizer.json,
        /// tokenizer_config.json, generation_config.json; or ORG/NAME[@REVISION] on the Hugging
        /// Face hub. Without it, a random tiny model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Prompt token ids, comma separated.
        #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
        ids: Vec<u32>,
        /// Prompt text (needs the folder's tokenizer). Without it or --ids, the prompt is read
        /// from standard input.
        #[arg(long)]
        prompt: Option<String>,
        /// Send --prompt as a user message through the folder's chat template.
        #[arg(long, requires = "prompt", conflicts_with = "ids")]
        chat: bool,
        /// A system message before the --chat prompt.
        #[arg(long, requires = "chat")]
        system: Option<String>,
        #[command(flatten)]
        decoding: DecodingArgs,
        /// The generation algorithm.
        #[arg(long, value_enum, default_value_t = SamplerKind::Sequential)]
        sampler: SamplerKind,
        #[command(flatten)]
        diffusion: DiffusionArgs,
        /// Self-speculative decoding: draft this many tokens with --draft-steps iterations
        /// each, verify them at --steps in one pass (greedy, fixed depth, full cache).
        #[arg(long, conflicts_with = "sampler")]
        speculate: Option<usize>,
        /// Recurrence steps per drafted token.
        #[arg(long, default_value_t = 4, requires = "speculate")]
        draft_steps: usize,
        /// Accept a draft when it is the verifier's argmax (1), or when its verifier
        /// probability is at least this fraction of the top one (< 1).
        #[arg(long, default_value_t = 1.0, requires = "speculate")]
        accept_threshold: f64,
    },
    /// Accuracy by recurrence depth (and under exit criteria) on local task files: multiple
    /// choice scored by log-likelihood (lm-eval's `acc` and `acc_norm`), generation by exact
    /// match.
    Eval(eval::EvalArgs),
    /// An interactive conversation through the folder's chat template: one user message per
    /// line of standard input (`/exit` or end of input ends it), the reply streamed to stdout.
    /// The KV cache is kept between turns, so each turn runs only what is new.
    // `--steps -1` is a bad value of --steps (named in the error), not an unknown flag `-1`.
    #[command(allow_negative_numbers = true)]
    Chat {
        /// Model folder with tokenizer.json and a chat template, or ORG/NAME[@REVISION].
        #[arg(long)]
        model: PathBuf,
        /// A system message before the conversation.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        decoding: DecodingArgs,
    },
    /// An OpenAI-style HTTP server (/v1/completions, /v1/chat/completions, /v1/models,
    /// /health) with per-request recurrence steps, exit criterion, cache strategy and warm
    /// start. Stops on Ctrl-C or SIGTERM, finishing running requests first.
    Serve {
        /// Model folder, as for `generate`. Without it, a random tiny model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Address to listen on. Binding beyond loopback needs --api-key (or --no-auth).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// The model's name in the API (default: the folder's name).
        #[arg(long)]
        model_name: Option<String>,
        /// Recurrence steps per token when a request does not say (`num_steps`).
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// The most recurrence steps a request may ask for.
        #[arg(long, default_value_t = 256)]
        max_steps: usize,
        /// Most requests running together (they join and leave the batch at every step).
        #[arg(long, default_value_t = 32)]
        max_batch: usize,
        /// Most requests waiting to start; more get 503.
        #[arg(long, default_value_t = 64)]
        queue: usize,
        /// KV-cache budget of the running batch, in bytes (suffixes K, M, G, KiB, MiB, GiB).
        /// A request that alone needs more is refused.
        #[arg(long, default_value = "2GiB", value_parser = parse_bytes)]
        kv_budget: usize,
        /// Most prompt positions per step: a longer prompt is prefilled a window at a time,
        /// between the running streams' steps (1 to the model's context).
        #[arg(long, default_value_t = EngineLimits::PREFILL_WINDOW.get())]
        prefill_window: usize,
        /// Most steps a decoded token that has exited early waits for others to exit with it,
        /// so that they share the coda and prelude passes (0 to --max-steps; 0: never waits).
        #[arg(long, default_value_t = EngineLimits::EXIT_WAIT)]
        exit_wait: usize,
        /// Require `Authorization: Bearer KEY` on /v1 routes (default: $HUGINN_API_KEY, which
        /// keeps the key out of the process list).
        #[arg(long)]
        api_key: Option<String>,
        /// Serve beyond loopback without an API key.
        #[arg(long, conflicts_with = "api_key")]
        no_auth: bool,
        /// Seconds running requests get to finish after Ctrl-C/SIGTERM before they are
        /// cancelled; a second later every connection still open is closed (0 to 3600).
        #[arg(long, default_value_t = connections::SHUTDOWN_GRACE.as_secs_f64())]
        shutdown_grace: f64,
        /// Seconds a request's headers may take, from the connection's opening or the end of
        /// its previous answer: also how long an idle keep-alive connection is kept
        /// (over 0, at most 3600).
        #[arg(long, default_value_t = connections::HEADER_TIMEOUT.as_secs_f64())]
        header_timeout: f64,
        /// Seconds a request's body may take once its headers have arrived; a slower one gets
        /// 408 (over 0, at most 3600).
        #[arg(long, default_value_t = connections::BODY_TIMEOUT.as_secs_f64())]
        body_timeout: f64,
        /// Most connections open at once; more wait unaccepted until one closes (default:
        /// 1024, or what the descriptor limit `ulimit -n` leaves besides 64 for the rest).
        #[arg(long)]
        max_connections: Option<usize>,
    },
    /// Write a copy of a float model folder with 8- or 4-bit linear weights (groups of 32 with
    /// an f16 scale each) beside its text files; every command opens it. Embeddings, the tied
    /// head and norms stay f32.
    Quantize {
        /// Float model folder, or ORG/NAME[@REVISION] on the Hugging Face hub.
        #[arg(long)]
        model: PathBuf,
        /// Folder to write: must not exist yet (or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Bits per weight: 8 or 4.
        #[arg(long)]
        bits: Bits,
    },
    /// Check a model against reference fixture folders (config.json, model.safetensors,
    /// expected.safetensors, generate.json).
    CheckFixture {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Print one JSON summary instead of a line per check.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match infer::cli::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    // Every command but `serve` works on this thread; the server's engine has its own.
    if !matches!(cli.command, Command::Serve { .. }) {
        model::kernels::threads::join_the_pool();
        model::kernels::heap::keep_freed_memory();
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let device = cli.device.device_in(cli.dtype)?;
    // An accelerator's own memory is not known here: only work on the CPU is checked against
    // the machine's.
    let on_host = cli.device == Backend::Cpu;
    match cli.command {
        Command::Depths {
            model,
            ids,
            max_depth,
            depths,
            top,
            seed,
            json,
        } => {
            let model = load(model.as_deref(), &device, cli.quantize)?;
            range::within("--max-depth", max_depth, 1, MAX_STEPS)?;
            range::within("--top", top, 1, model.config().vocab_size)?;
            let depths = if depths.is_empty() {
                (0..).map(|p| 1 << p).take_while(|d| *d <= max_depth).collect()
            } else {
                depths
            };
            if let Some(d) = depths.iter().find(|d| **d == 0 || **d > max_depth) {
                bail!("--depths value {d} is outside 1..={max_depth}");
            }
            let init = seed.map_or(InitialState::Zeros, |seed| InitialState::LikeInit { seed, scale: 1.0 });
            let preds = predictions_by_depth(&model, &ids, max_depth, &depths, &init, top)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&preds)?);
            } else {
                println!(
                    "{:>5}  {:>8}  {:>9}  top next tokens (id: probability)",
                    "depth", "entropy", "residual"
                );
                for p in preds {
                    let top: Vec<String> = p.top.iter().map(|(id, prob)| format!("{id}: {prob:.3}")).collect();
                    println!(
                        "{:>5}  {:>8.3}  {:>9.2e}  {}",
                        p.depth,
                        p.entropy,
                        p.relative_residual,
                        top.join("  ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            model,
            ids,
            prompt,
            chat,
            system,
            decoding: args,
            sampler,
            diffusion,
            speculate,
            draft_steps,
            accept_threshold,
        } => {
            let mut folder = match &model {
                Some(dir) => open_folder(dir, &device, cli.quantize)?,
                None => ModelFolder::from_model(load(None, &device, cli.quantize)?),
            };
            let (config, decoding) = args.resolve(&mut folder)?;
            let prompt = match prompt {
                None if ids.is_empty() => {
                    if std::io::stdin().is_terminal() {
                        bail!("give a prompt: --prompt TEXT, --ids IDS, or text on standard input");
                    }
                    let mut text = String::new();
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .context("reading the prompt from stdin")?;
                    let text = text.strip_suffix('\n').unwrap_or(&text);
                    if text.is_empty() {
                        bail!("the prompt on standard input is empty");
                    }
                    if folder.tokenizer.is_none() {
                        bail!("a text prompt needs the model folder's tokenizer (tokenizer.json); use --ids");
                    }
                    folder.encode(text)?
                }
                None => ids,
                Some(text) if chat => {
                    let system = system.map(|s| Message::new(Role::System, s));
                    let messages: Vec<Message> = system.into_iter().chain([Message::new(Role::User, text)]).collect();
                    folder.encode_chat(&messages)?
                }
                Some(text) => folder.encode(&text)?,
            };
            let max_new = args.fitting_max_new(&folder, prompt.len(), speculate.unwrap_or(0))?;
            let mut stdout = std::io::stdout().lock();
            if sampler == SamplerKind::Sequential && diffusion.any() {
                bail!("the diffusion sampler's flags (--headway, --freeze-strategy, …) need --sampler diffusion");
            }
            let shape = folder.model.config();
            let element = float_bytes(&device);
            if sampler == SamplerKind::Diffusion {
                let config = diffusion.config(&config, args.cache, decoding.sampling.seed)?;
                config.check(shape, prompt.len(), max_new).map_err(diffusion::named)?;
                if on_host {
                    let needed = config.memory_bytes(shape, prompt.len(), max_new, element);
                    limits::check_machine_memory("this generation's KV cache and waves", needed)?;
                }
                diffusion::run(&folder, &prompt, max_new, &config, &decoding, &mut stdout)?;
                args.report_seed(&decoding, config.init_scale > 0.0);
                return Ok(ExitCode::SUCCESS);
            }
            let (strategy, steps, positions) = match speculate {
                // Speculation runs the full cache at the deeper of its two depths.
                Some(lookahead) => (
                    Strategy::default(),
                    config.max_steps.max(draft_steps),
                    prompt.len() + max_new + lookahead,
                ),
                None => (config.strategy, config.max_steps, prompt.len() + max_new),
            };
            if on_host {
                let needed = limits::kv_cache_bytes(shape, strategy, steps, positions, 1, element);
                limits::check_machine_memory("this generation's KV cache", needed)?;
            }
            let started = Instant::now();
            let mut first = None;
            let steps = if let Some(lookahead) = speculate {
                if config.criterion != Criterion::None
                    || decoding.sampling.temperature != 0.0
                    || config.warm_start != WarmStart::Cold
                {
                    bail!(
                        "--speculate decodes greedily at a fixed depth: leave out --criterion, --temperature and --warm-start"
                    );
                }
                let config = SpeculativeConfig {
                    draft_steps,
                    lookahead,
                    verify_steps: config.max_steps,
                    threshold: accept_threshold,
                };
                limits::check_speculative(shape, prompt.len(), max_new, &config).map_err(decoding::named)?;
                let out = speculative::generate(&folder.model, &prompt, max_new, config)?;
                first = Some(started.elapsed());
                let mut tokens = out.tokens;
                tokens.truncate(max_new);
                if let Some(end) = tokens.iter().position(|t| folder.stop_tokens.contains(t)) {
                    tokens.truncate(end + 1);
                }
                match &folder.tokenizer {
                    Some(tokenizer) => {
                        let mut text = TextStream::new(tokenizer, folder.stop_strings.clone());
                        for &token in &tokens {
                            let piece = text.push(token)?;
                            stdout.write_all(piece.text.as_bytes())?;
                            if piece.stopped {
                                break;
                            }
                        }
                        stdout.write_all(text.finish()?.as_bytes())?;
                    }
                    None => write!(
                        stdout,
                        "{}",
                        tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                    )?,
                }
                let mut between = out.steps_between_tokens;
                between.truncate(tokens.len());
                between
            } else {
                let mut on_first = || {
                    first.get_or_insert_with(|| started.elapsed());
                };
                let out = match &folder.tokenizer {
                    Some(tokenizer) => {
                        TextStream::new(tokenizer, folder.stop_strings.clone())
                            .generate(&folder.model, &prompt, max_new, config, &decoding, |piece| {
                                on_first();
                                stdout.write_all(piece.as_bytes())?;
                                stdout.flush()
                            })?
                            .generation
                    }
                    None => stream_ids(&folder, &prompt, max_new, config, &decoding, &mut stdout, on_first)?,
                };
                out.steps_per_token
            };
            writeln!(stdout)?;
            let total = started.elapsed();
            let listed: Vec<String> = steps.iter().map(usize::to_string).collect();
            let mean = steps.iter().sum::<usize>() as f64 / steps.len().max(1) as f64;
            let label = if speculate.is_some() {
                "steps between tokens"
            } else {
                "steps per token"
            };
            eprintln!("{label}: {} (mean {mean:.2})", listed.join(","));
            args.report_seed(&decoding, false);
            // The first token comes out of the prompt's pass; the rest are decoding.
            let first = first.unwrap_or(total);
            let decode = (total - first).as_secs_f64();
            if speculate.is_some() {
                eprintln!(
                    "prompt {} tokens and {} new in {:.2} s: {:.1} tok/s · steps between tokens mean {mean:.2}, max {}",
                    prompt.len(),
                    steps.len(),
                    total.as_secs_f64(),
                    steps.len() as f64 / total.as_secs_f64(),
                    steps.iter().max().copied().unwrap_or(0)
                );
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "prompt {} tokens, {:.1} tok/s · decode {} tokens, {:.1} tok/s · steps per token mean {mean:.2}, max {}",
                prompt.len(),
                prompt.len() as f64 / first.as_secs_f64(),
                steps.len().saturating_sub(1),
                steps.len().saturating_sub(1) as f64 / decode.max(f64::MIN_POSITIVE),
                steps.iter().max().copied().unwrap_or(0)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(args) => {
            let folder = open_folder(&args.model, &device, cli.quantize)?;
            eval::run(&folder, &args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Chat {
            model,
            system,
            decoding: args,
        } => {
            let folder = open_folder(&model, &device, cli.quantize)?;
            chat::run(folder, system, &args, on_host)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            model,
            addr,
            model_name,
            steps,
            max_steps,
            max_batch,
            queue,
            kv_budget,
            prefill_window,
            exit_wait,
            api_key,
            no_auth,
            shutdown_grace,
            header_timeout,
            body_timeout,
            max_connections,
        } => {
            let api_key = api_key
                .or_else(|| std::env::var("HUGINN_API_KEY").ok())
                .filter(|k| !k.is_empty() && !no_auth);
            if !addr.ip().is_loopback() && api_key.is_none() && !no_auth {
                bail!("listening on {addr} (beyond loopback) needs --api-key, or --no-auth to serve without one");
            }
            if max_steps == 0 || max_steps > MAX_STEPS {
                bail!("--max-steps must be in 1..={MAX_STEPS}");
            }
            if steps == 0 || steps > max_steps {
                bail!("--steps must be in 1..=--max-steps ({max_steps})");
            }
            if exit_wait > max_steps {
                bail!("--exit-wait must be in 0..=--max-steps ({max_steps})");
            }
            if !(1..=MAX_BATCH).contains(&max_batch) {
                bail!("--max-batch must be in 1..={MAX_BATCH}");
            }
            if !(1..=MAX_QUEUE).contains(&queue) {
                bail!("--queue must be in 1..={MAX_QUEUE}");
            }
            let memory = physical_memory();
            if kv_budget == 0 || kv_budget > memory {
                bail!("--kv-budget must be between 1 byte and this machine's memory ({memory} bytes)");
            }
            let seconds = |flag: &str, value: f64, zero: bool| -> Result<Duration> {
                let low = if zero { '[' } else { '(' };
                if !(value.is_finite() && (value > 0.0 || (zero && value == 0.0)) && value <= MAX_SECONDS) {
                    bail!("{flag} must be a number of seconds in {low}0, {MAX_SECONDS}] (got {value:?})");
                }
                Ok(Duration::from_secs_f64(value))
            };
            let most = connections::most_connections();
            if most == 0 {
                bail!(
                    "the descriptor limit (ulimit -n) leaves no room for connections besides the {} the server keeps for itself; raise it",
                    connections::DESCRIPTOR_HEADROOM
                );
            }
            let max_connections = max_connections.unwrap_or(connections::MAX_CONNECTIONS.min(most));
            if !(1..=most).contains(&max_connections) {
                bail!(
                    "--max-connections must be in 1..={most}: the descriptor limit (ulimit -n) less {} for the rest",
                    connections::DESCRIPTOR_HEADROOM
                );
            }
            let connection_limits = ConnectionLimits {
                header_timeout: seconds("--header-timeout", header_timeout, false)?,
                body_timeout: seconds("--body-timeout", body_timeout, false)?,
                max_connections,
                shutdown_grace: seconds("--shutdown-grace", shutdown_grace, true)?,
            };
            let name = model_name.unwrap_or_else(|| {
                model
                    .as_deref()
                    .map(|dir| dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()))
                    .and_then(|dir| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "huginn".into())
            });
            let folder = match &model {
                Some(dir) => open_folder(dir, &device, cli.quantize)?,
                None => ModelFolder::from_model(load(None, &device, cli.quantize)?),
            };
            let context = folder.model.config().block_size;
            let prefill_window = NonZeroUsize::new(prefill_window)
                .filter(|w| w.get() <= context)
                .with_context(|| format!("--prefill-window must be in 1..={context} (the model's context)"))?;
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            let defaults = ServerDefaults {
                model_name: name,
                num_steps: steps,
                max_num_steps: max_steps,
            };
            let limits = EngineLimits {
                max_batch,
                queue_capacity: queue,
                kv_budget_bytes: kv_budget,
                prefill_window,
                exit_wait,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                let app = Arc::new(App::new(folder, defaults, limits, api_key));
                eprintln!(
                    "huginn serve: at most {} connections open; headers within {} s (also the keep-alive idle limit), bodies within {} s",
                    connection_limits.max_connections,
                    connection_limits.header_timeout.as_secs_f64(),
                    connection_limits.body_timeout.as_secs_f64()
                );
                eprintln!("huginn serve: listening on http://{}", listener.local_addr()?);
                serve(listener, app, shutdown_signal(), connection_limits)
                    .await
                    .context("serving")
            })?;
            eprintln!("huginn serve: stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Quantize { model, out, bits } => {
            if cli.quantize.is_some() {
                bail!("`huginn quantize` takes its width from --bits, not --quantize");
            }
            quantize_folder(&model, &out, bits)?;
            eprintln!(
                "huginn quantize: wrote {}-bit weights to {}",
                bits.count(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckFixture { dirs, json } => {
            let mut reports = Vec::new();
            for dir in &dirs {
                let report = check_dir(dir, &device).with_context(|| format!("checking {}", dir.display()))?;
                if !json {
                    println!("== {}", dir.display());
                    for check in report.forward.iter().chain(&report.train).chain(&report.generate) {
                        println!("{check}");
                    }
                    if !report.generate_unsupported.is_empty() {
                        println!(
                            "     generate.json: {} runs not checked by this build",
                            report.generate_unsupported.len()
                        );
                    }
                }
                reports.push(report);
            }
            let summary = Summary::of(&reports);
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                println!(
                    "forward: {} checked, {} failed, max |err| {:.3e}; train: {} checked, {} failed; \
                     generate: {} checked, {} failed, {} runs unsupported",
                    summary.forward.checked,
                    summary.forward.failed,
                    summary.forward.max_abs_err,
                    summary.train.checked,
                    summary.train.failed,
                    summary.generate.checked,
                    summary.generate.failed,
                    summary.generate.unsupported.len()
                );
            }
            Ok(if summary.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Generation for a model without a tokenizer: the new token ids, comma separated, as they come.
fn stream_ids(
    folder: &ModelFolder,
    prompt: &[u32],
    max_new: usize,
    config: AdaptiveConfig,
    decoding: &Decoding,
    out: &mut impl Write,
    mut on_token: impl FnMut(),
) -> Result<AdaptiveGeneration> {
    let mut separator = "";
    adaptive::try_generate_streaming(&folder.model, prompt, max_new, config, decoding, |token, _| {
        on_token();
        write!(out, "{separator}{token}")?;
        out.flush()?;
        separator = ",";
        Ok(ControlFlow::Continue(()))
    })
}

/// Most requests `serve` decodes together, and most it queues.
const MAX_BATCH: usize = 1024;
const MAX_QUEUE: usize = 1 << 16;
/// Longest timeout or grace period `serve` takes, in seconds: an hour.
const MAX_SECONDS: f64 = 3600.0;

/// This machine's memory in bytes (`usize::MAX` where it cannot be read).
fn physical_memory() -> usize {
    // SAFETY: sysconf only reads system constants.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGE_SIZE)) };
    match (usize::try_from(pages), usize::try_from(page)) {
        (Ok(pages), Ok(page)) if pages > 0 && page > 0 => pages.saturating_mul(page),
        _ => usize::MAX,
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

/// `512MiB`, `2G`, `1000000`: a byte count.
fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number.parse().map_err(|_| format!("{text:?} is not a byte count"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} (use K, M, G, KiB, MiB or GiB)")),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A model folder here, or `ORG/NAME[@REVISION]` fetched into the Hugging Face cache.
fn open_folder(spec: &std::path::Path, device: &Device, quantize: Option<Bits>) -> Result<ModelFolder> {
    let dir = folder::hub::resolve(spec)?;
    ModelFolder::open_quantized(&dir, device, quantize).with_context(|| format!("loading {}", dir.display()))
}

/// A model folder, or without one the random tiny model (rounded to `quantize` bits either way).
fn load(dir: Option<&std::path::Path>, device: &Device, quantize: Option<Bits>) -> Result<Huginn> {
    match dir {
        Some(spec) => {
            let dir = folder::hub::resolve(spec)?;
            Huginn::from_pretrained_quantized(&dir, device, quantize)
                .with_context(|| format!("loading {}", dir.display()))
        }
        None => {
            let model = HuginnConfig::tiny(256, 64, 4, (1, 2, 1)).init(device, 0);
            Ok(match quantize {
                Some(bits) => model.quantize(bits),
                None => model,
            })
        }
    }
}

/// `huginn quantize`: the folder is written beside `out` under a temporary name and renamed
/// into place once complete, so an interrupted run leaves no half-written model under `out`.
fn quantize_folder(spec: &std::path::Path, out: &std::path::Path, bits: Bits) -> Result<()> {
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} exists and is not empty; quantize into a new folder", out.display());
    }
    let dir = folder::hub::resolve(spec)?;
    let config = HuginnConfig::from_file(dir.join(model::pretrained::CONFIG_FILE))
        .with_context(|| format!("loading {}", dir.display()))?;
    if let Some(q) = &config.quantization {
        bail!(
            "{} already holds {}-bit weights; quantize the float folder it came from",
            dir.display(),
            q.bits.count()
        );
    }
    // On the CPU in f32: the levels are rounded on the host from the stored values either way.
    let model = Huginn::from_pretrained_quantized(&dir, &Device::flex(), Some(bits))
        .with_context(|| format!("loading {}", dir.display()))?;
    let name = out
        .file_name()
        .with_context(|| format!("{} names no folder", out.display()))?;
    let prefix = format!(".{}.partial-", name.to_string_lossy());
    remove_abandoned(out, &prefix);
    let partial = out.with_file_name(format!("{prefix}{}", std::process::id()));
    let written = (|| -> Result<()> {
        model.export_hf(&partial, QUANTIZED_SHARD_BYTES)?;
        for file in [
            folder::TOKENIZER_FILE,
            folder::TOKENIZER_CONFIG_FILE,
            folder::CHAT_TEMPLATE_FILE,
            folder::GENERATION_CONFIG_FILE,
        ] {
            if dir.join(file).exists() {
                std::fs::copy(dir.join(file), partial.join(file)).with_context(|| format!("copying {file}"))?;
            }
        }
        model::pause::pause_point("quantize-before-rename");
        if out.exists() {
            std::fs::remove_dir(out).with_context(|| format!("replacing the empty {}", out.display()))?;
        }
        std::fs::rename(&partial, out).with_context(|| format!("moving the model into {}", out.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    written
}

/// Removes the temporary folders that earlier `quantize` runs into the same `out` left when
/// they were killed: those named `PREFIX<pid>` whose process is gone. A run still writing
/// keeps its folder. Only where a process can be looked up by id (Linux's `/proc`).
fn remove_abandoned(out: &std::path::Path, prefix: &str) {
    let proc = std::path::Path::new("/proc/self");
    let (Some(parent), true) = (out.parent(), proc.exists()) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        parent
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(
                    "removed {}, left by a quantize run that was stopped",
                    entry.path().display()
                ),
                Err(e) => tracing::warn!("could not remove {}: {e}", entry.path().display()),
            }
        }
    }
}

/// Shards of a quantized folder: as Hugging Face's default, 5 GB.
const QUANTIZED_SHARD_BYTES: usize = 5_000_000_000;
