//! `huginn chat`: a conversation on standard input, one user message per line. Each turn
//! renders the whole conversation through the chat template and hands it to an
//! [`infer::adaptive::Conversation`], which reuses the cache for what the last turn already
//! ran.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use folder::ModelFolder;
use folder::chat::{Message, Role};
use infer::adaptive::Conversation;
use infer::cache::float_bytes;
use infer::limits;
use infer::text::{TextError, TextStream};

use crate::decoding::DecodingArgs;

/// Runs the conversation; `on_host`: the model runs on the CPU, whose memory bounds the cache.
pub fn run(mut folder: ModelFolder, system: Option<String>, args: &DecodingArgs, on_host: bool) -> Result<()> {
    let (config, decoding) = args.resolve(&mut folder)?;
    if folder.chat_template.is_none() || folder.tokenizer.is_none() {
        bail!("chat needs the model folder's tokenizer.json and a chat template");
    }
    args.report_seed(&decoding, false);
    let folder = &folder;
    let tokenizer = folder.tokenizer.as_ref().expect("checked above");
    let context = folder.model.config().block_size;
    let mut messages: Vec<Message> = system.into_iter().map(|s| Message::new(Role::System, s)).collect();
    let mut conversation = Conversation::new(&folder.model, config);
    let interactive = std::io::stdin().is_terminal();
    let mut lines = std::io::stdin().lock().lines();
    let mut stdout = std::io::stdout().lock();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/exit" {
            break;
        }
        messages.push(Message::new(Role::User, line));
        let tokens = folder.encode_chat(&messages)?;
        if tokens.len() >= context {
            bail!(
                "the conversation has grown to {} tokens, past the context of {context}",
                tokens.len()
            );
        }
        let max_new = args.max_new(folder, tokens.len())?.min(context - tokens.len());
        // The cache holds the whole conversation: checked as it grows, before the turn runs.
        if on_host {
            let needed = limits::kv_cache_bytes(
                folder.model.config(),
                config.strategy,
                config.max_steps,
                tokens.len() + max_new,
                1,
                float_bytes(&folder.model.device()),
            );
            limits::check_machine_memory("this conversation's KV cache", needed)?;
        }
        let mut text = TextStream::new(tokenizer, folder.stop_strings.clone());
        let mut reply = String::new();
        let mut failed: Option<TextError> = None;
        let mut stopped = false;
        let started = Instant::now();
        let (generation, reused) = conversation.reply(&tokens, max_new, &decoding, |token, _| {
            let piece = match text.push(token) {
                Ok(piece) => piece,
                Err(e) => {
                    failed = Some(e);
                    return ControlFlow::Break(());
                }
            };
            reply += &piece.text;
            let shown = stdout.write_all(piece.text.as_bytes()).and_then(|()| stdout.flush());
            if let Err(e) = shown {
                failed = Some(e.into());
                return ControlFlow::Break(());
            }
            stopped = piece.stopped;
            if stopped {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        if !stopped {
            let tail = text.finish()?;
            stdout.write_all(tail.as_bytes())?;
            reply += &tail;
        }
        writeln!(stdout)?;
        stdout.flush()?;
        let steps = &generation.steps_per_token;
        eprintln!(
            "[{} new tokens in {:.2} s · {} of {} prompt tokens reused from the cache · steps per token mean {:.2}, max {}]",
            steps.len(),
            started.elapsed().as_secs_f64(),
            reused,
            tokens.len(),
            steps.iter().sum::<usize>() as f64 / steps.len().max(1) as f64,
            steps.iter().max().copied().unwrap_or(0)
        );
        messages.push(Message::new(Role::Assistant, reply));
    }
    Ok(())
}
