fn main() {
    // placeholder: the jobs conformance run is being written
}
