//! `--init-from MODEL` (or `init_from` in the file): the model's shape comes from the folder's
//! `config.json`, so shape flags typed as well, and the model section of a file that names the
//! model, must agree with it; the training depth is the model's own unless depth flags are
//! typed; a text run reads with the model's tokenizer.

use anyhow::{Result, bail};
use train::data::{DataConfig, TokenizerSource};
use train::depth::DepthScheme;
use train::finetune;
use train::limits::MAX_MEAN_DEPTH;
use train::run::RunConfig;

use crate::{Args, depth_scheme, fit_to_depth};

pub fn apply(config: &mut RunConfig, args: &Args, given: &dyn Fn(&str) -> bool) -> Result<()> {
    if given("init_from") {
        config.init_from = args.init_from.clone();
    }
    let Some(spec) = config.init_from.clone() else {
        return Ok(());
    };
    let dir = finetune::resolve(&spec)?;
    let mut model = finetune::folder_config(&dir)?;
    let layers = (
        model.n_layers_in_prelude,
        model.n_layers_in_recurrent_block,
        model.n_layers_in_coda,
    );
    let name = spec.display();
    // A file that names the model keeps its model section: it must be the model's shape.
    if let Some(path) = &args.config
        && !given("init_from")
    {
        let differences = finetune::shape_differences(&RunConfig::from_toml_file(path)?.model, &model);
        if !differences.is_empty() {
            bail!(
                "{}: the model section contradicts {name}'s config: {}",
                path.display(),
                differences.join(", ")
            );
        }
    }
    if given("width") && args.width != model.n_embd {
        bail!(
            "--width {} contradicts {name}, whose width is {}; leave it out",
            args.width,
            model.n_embd
        );
    }
    if given("heads") && args.heads != model.n_heads {
        bail!(
            "--heads {} contradicts {name}, which has {} heads; leave it out",
            args.heads,
            model.n_heads
        );
    }
    if given("layers") && args.layers != layers {
        bail!(
            "--layers {:?} contradicts {name}, whose layers are {layers:?}; leave it out",
            args.layers
        );
    }
    if given("vocab_size") && args.vocab_size != model.vocab_size {
        bail!("--vocab-size does not apply to a fine-tuning run: the tokenizer is {name}'s");
    }
    if let DataConfig::Text { tokenizer, .. } = &mut config.data
        && !given("tokenizer")
    {
        *tokenizer = TokenizerSource::File {
            path: dir.join("tokenizer.json"),
        };
    }
    let depth_typed = ["depth_scheme", "mean_depth", "backprop"].iter().any(|f| given(f));
    if args.config.is_none() && !depth_typed {
        for (field, value) in [
            ("mean_recurrence", model.mean_recurrence),
            ("mean_backprop_depth", model.mean_backprop_depth),
        ] {
            if !(1..=MAX_MEAN_DEPTH).contains(&(value as u64)) {
                bail!(
                    "{}: {field} = {value} is out of range for training (1..={MAX_MEAN_DEPTH}); give --mean-depth \
                     and --backprop",
                    dir.join(model::pretrained::CONFIG_FILE).display()
                );
            }
        }
        // The model's own depth, as its config records it.
        config.depth = depth_scheme(args.depth_scheme, model.mean_recurrence, model.mean_backprop_depth);
        if !given("eval_depths") {
            config.eval_depths = RunConfig::default_eval_depths(&config.depth);
        }
    } else {
        let backprop = match config.depth {
            DepthScheme::PoissonLognormalFilling { backprop, .. } | DepthScheme::Fixed { backprop, .. } => backprop,
            DepthScheme::NonRecurrent => model.mean_backprop_depth,
        };
        fit_to_depth(&mut model, &config.depth, backprop);
    }
    config.model = model;
    Ok(())
}
