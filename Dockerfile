# sockredir's container image: one static binary, nothing else.
#   docker build -t sockredir:latest .
# The build needs the Go module proxy and nothing more: the compiled BPF
# objects are committed, so no clang.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
        -o /out/sockredir ./cmd/sockredir

# No shell and no libc: the binary is static, and the daemon runs nothing else.
FROM scratch
COPY --from=build /out/sockredir /usr/local/bin/sockredir
ENTRYPOINT ["/usr/local/bin/sockredir"]
CMD ["daemon"]
