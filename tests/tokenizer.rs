//! SmolLM2's tokenizer, built from the GGUF metadata.

mod common;

use common::smollm2;

#[test]
fn known_prompt_encodes_to_known_ids() {
    let (checkpoint, _) = smollm2();
    let ids = checkpoint
        .tokenizer
        .encode("The capital of France is")
        .unwrap();
    assert_eq!(ids, [504, 3575, 282, 4649, 314]);
}

#[test]
fn encode_then_decode_returns_the_text() {
    let (checkpoint, _) = smollm2();
    let texts = [
        "The capital of France is Paris.",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "digits 1234567 and 3.14159",
        "Unicode: café, naïve, 東京, emoji 🦀",
        "<|im_start|>user\nHello!<|im_end|>",
        "",
    ];
    for text in texts {
        let ids = checkpoint.tokenizer.encode(text).unwrap();
        assert_eq!(checkpoint.tokenizer.decode(&ids).unwrap(), text);
    }
}

#[test]
fn digits_are_split_one_by_one_like_smollm2() {
    let (checkpoint, _) = smollm2();
    let tokenizer = &checkpoint.tokenizer;
    let ids = tokenizer.encode("2024").unwrap();
    let pieces: Vec<String> = ids
        .iter()
        .map(|&i| tokenizer.id_to_token(i).unwrap())
        .collect();
    assert_eq!(pieces, ["2", "0", "2", "4"]);
}

#[test]
fn control_tokens_are_matched_whole() {
    let (checkpoint, _) = smollm2();
    let ids = checkpoint
        .tokenizer
        .encode("<|im_start|>assistant")
        .unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is token 1");
    assert_eq!(checkpoint.tokenizer.vocab_size(), 49152);
}
