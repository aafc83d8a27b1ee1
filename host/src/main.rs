//! The `tailgate` binary; everything it does is in the library's [`tailgate::cli`].

fn main() -> std::process::ExitCode {
    tailgate::cli::main()
}
