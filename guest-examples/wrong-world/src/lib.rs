//! `wrong-world`: a valid component that does not implement
//! `wasmq:plugin/processor` (it exports a bare `run` function instead), so the
//! host must refuse to load it.

wit_bindgen::generate!({
    inline: "package test:other; world other { export run: func() -> u32; }",
});

struct WrongWorld;

impl Guest for WrongWorld {
    fn run() -> u32 {
        42
    }
}

export!(WrongWorld);
