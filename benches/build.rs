fn main() {
    sid_build::link_libtorch();
}
