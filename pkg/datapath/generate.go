package datapath

// The generated Go bindings and BPF objects are committed so that `go build`
// needs no clang; `make generate` reproduces them byte for byte.
//
//go:generate go tool bpf2go -cc clang -target bpfel -go-package datapath -output-stem sockops sockops ../../bpf/sockops.c -- -I../../bpf -I../../bpf/headers -Wall -Werror -mcpu=v3
//go:generate go tool bpf2go -cc clang -target bpfel -go-package datapath -output-stem redirect redirect ../../bpf/redirect.c -- -I../../bpf -I../../bpf/headers -Wall -Werror -mcpu=v3
//go:generate go tool bpf2go -cc clang -target bpfel -go-package datapath -output-stem sockopt sockopt ../../bpf/sockopt.c -- -I../../bpf -I../../bpf/headers -Wall -Werror -mcpu=v3
//go:generate go tool bpf2go -cc clang -target bpfel -go-package datapath -output-stem inspect inspect ../../bpf/inspect.c -- -I../../bpf -I../../bpf/headers -Wall -Werror -mcpu=v3
//go:generate go tool bpf2go -cc clang -target bpfel -go-package datapath -output-stem guard guard ../../bpf/guard.c -- -I../../bpf -I../../bpf/headers -Wall -Werror -mcpu=v3
//go:generate go tool bpf2go -cc clang -target bpfel -go-package datapath -output-stem splicewatch splicewatch ../../bpf/splicewatch.c -- -I../../bpf -I../../bpf/headers -Wall -Werror -mcpu=v3
