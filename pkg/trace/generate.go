package trace

// The generated Go bindings and BPF object are committed so that `go build`
// needs no clang; `make generate` reproduces them byte for byte.
//
//go:generate go tool bpf2go -cc clang -target bpfel -go-package trace -output-stem trace -type event trace ../../bpf/trace.c -- -I../../bpf -I../../bpf/headers -Wall -Werror -mcpu=v3
