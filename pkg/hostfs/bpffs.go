package hostfs

// OnBPFFS reports whether path, or its closest existing ancestor, is on a
// BPF filesystem. Unlike EnsureBPFFS it changes nothing.
func OnBPFFS(path string) (bool, error) {
	return isBPFFS(nearestExisting(path))
}
