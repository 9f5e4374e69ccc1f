//! The tokenizers built from GGUF metadata: SmolLM2's byte-level BPE and Gemma 3's
//! SentencePiece BPE.

mod common;

use common::{gemma3_path, smollm2};
use flexmodel::weights::GgufFile;

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

/// Gemma 3's tokenizer, from the SentencePiece vocabulary in its GGUF.
fn gemma3_tokenizer() -> flexmodel::Tokenizer {
    GgufFile::open(&gemma3_path()).unwrap().tokenizer().unwrap()
}

#[test]
fn gemma3_text_encodes_as_sentencepiece_and_llama_cpp_encode_it() {
    // The ids of Google's SentencePiece model rebuilt from the GGUF's vocabulary (and of
    // a port of llama.cpp's SentencePiece tokenizer, which agree): `<bos>` first, user-
    // defined tokens (newline, tab, runs of spaces) whole, bytes for what no piece has.
    let tokenizer = gemma3_tokenizer();
    let cases: [(&str, &[u32]); 5] = [
        ("Paris is the capital of", &[2, 50429, 563, 506, 5279, 529]),
        (
            "The quick brown fox jumps over the lazy dog.",
            &[
                2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761,
            ],
        ),
        ("  two leading spaces", &[2, 138, 13498, 5830, 9952]),
        (
            "naïve café 東京 🤖",
            &[2, 1789, 238527, 560, 33443, 86459, 236743, 246143],
        ),
        ("Hello\nworld\ttab", &[2, 9259, 107, 12392, 255968, 4823]),
    ];
    for (text, expected) in cases {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids, expected, "{text:?}");
        assert_eq!(tokenizer.decode(&ids[1..]).unwrap(), text, "{text:?}");
    }
}
