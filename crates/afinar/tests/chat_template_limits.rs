//! What a hostile chat template costs: every input of
//! `fuzz/regressions/chat_template/` rendered under the guarded allocator
//! (`afinar::mem_guard`), its time and peak memory measured and printed:
//! `cargo test --release -p afinar --test chat_template_limits -- --nocapture`.
//! And the backstop: a render that no fuel accounts for stops the process
//! with a message naming the chat template and the limit.

use afinar::hub::chat_template::{ChatTemplate, Message, Role, FUEL, MEMORY_LIMIT};
use std::path::Path;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: afinar::mem_guard::Guarded<std::alloc::System> =
    afinar::mem_guard::Guarded(std::alloc::System);

fn chat() -> [Message; 2] {
    [
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, "Hi"),
    ]
}

/// Each regression ends within 3 s holding at most half the memory limit
/// (fuel fails it long before the backstop), and a failure names the chat
/// template and what limited it.
#[test]
fn hostile_templates_end_quickly_in_bounded_memory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/chat_template");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 20,
        "{} inputs in {}",
        inputs.len(),
        dir.display()
    );
    let limits = [
        format!("budget of {FUEL} fuel"),
        "range has too many elements".into(),
        "repeated sequence is too large".into(),
        "recursion limit exceeded".into(),
        "nested deeper than".into(),
    ];
    let mut table = vec![format!(
        "{:<30} {:>8} {:>10}  result",
        "input", "time", "peak"
    )];
    let mut bad = Vec::new();
    for path in &inputs {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let src = std::fs::read_to_string(path).unwrap();
        let start = Instant::now();
        let (r, peak) = match ChatTemplate::new(&src, "<s>", "</s>") {
            Ok(t) => t.render_measured(&chat(), true),
            Err(e) => (Err(e), 0),
        };
        let took = start.elapsed();
        let result = match &r {
            Ok(out) => format!("rendered, {} bytes", out.len()),
            Err(e) => e.to_string(),
        };
        table.push(format!(
            "{name:<30} {:>7.3}s {:>6.1} MiB  {}",
            took.as_secs_f64(),
            peak as f64 / (1 << 20) as f64,
            result.chars().take(110).collect::<String>()
        ));
        let named = match &r {
            Ok(_) => true,
            Err(e) => {
                let e = e.to_string();
                e.contains("chat template") && limits.iter().any(|l| e.contains(l.as_str()))
            }
        };
        if took > Duration::from_secs(3) || peak > MEMORY_LIMIT / 2 || !named {
            bad.push(name);
        }
    }
    eprintln!("{}", table.join("\n"));
    assert!(bad.is_empty(), "over time or memory, or unclear: {bad:?}");
}

/// `~` formats a huge value with no fuel charged first: the guard stops the
/// render (in a child process, as it aborts) before it holds 256 MiB.
#[test]
fn backstop_stops_what_no_fuel_sees() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--ignored", "--exact", "backstop_child", "--nocapture"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "afinar: rendering the chat template needed more than {} MiB of memory (its limit); stopped",
            MEMORY_LIMIT >> 20
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("rendered anyway"), "{stderr}");
}

#[test]
#[ignore = "run by backstop_stops_what_no_fuel_sees in a child process"]
fn backstop_child() {
    let t = ChatTemplate::new("{{ ('' ~ (['x' * 10**6] * 10**4)) | length }}", "", "").unwrap();
    let r = t.render(&chat(), false);
    eprintln!("rendered anyway: {r:?}");
}

/// Real templates on a long chat use a small part of both budgets (printed).
#[test]
fn real_templates_use_a_small_part_of_the_budget() {
    let smollm2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let llama3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
    for (turns, bytes) in [(2000, 200), (2, 1 << 20)] {
        let msgs: Vec<Message> = (0..turns)
            .map(|i| {
                let role = [Role::User, Role::Assistant][i % 2];
                Message::new(role, "lorem ipsum ".repeat(bytes / 12))
            })
            .collect();
        for (name, src) in [("smollm2", smollm2), ("llama3", llama3)] {
            let (out, stats) = ChatTemplate::new(src, "<s>", "</s>")
                .unwrap()
                .render_counted(&msgs, true)
                .unwrap();
            eprintln!(
                "{name}, {turns} turns of {bytes} bytes: {} bytes out, fuel {} ({:.1}%), peak {:.1} MiB",
                out.len(),
                stats.fuel,
                100.0 * stats.fuel as f64 / FUEL as f64,
                stats.peak_bytes as f64 / (1 << 20) as f64
            );
            assert!(stats.fuel < FUEL / 5, "{name}: {stats:?}");
            assert!(stats.peak_bytes < MEMORY_LIMIT / 8, "{name}: {stats:?}");
            assert!(stats.peak_bytes > 0, "the guarded allocator counts");
        }
    }
}
