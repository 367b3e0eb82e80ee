package main

import (
	"bufio"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// kernel is a bootable kernel extracted from a Debian package.
type kernel struct {
	pkg     string
	release string   // `uname -r` it will report
	vmlinuz string   // path on the host
	modules []string // uncompressed .ko paths on the host, dependencies first
}

// resolvePackage turns a package name or glob into a package name,
// picking the newest package apt knows that matches the glob.
func resolvePackage(pattern string) (string, error) {
	if !strings.ContainsAny(pattern, "*?[") {
		return pattern, nil
	}
	matches, err := aptPackagesMatching(pattern)
	if err != nil {
		return "", err
	}
	if len(matches) == 0 {
		// A fresh machine may have no package lists yet.
		fmt.Printf("no package matches %s; running apt-get update\n", pattern)
		if err := runQuiet(exec.Command("apt-get", "update")); err != nil {
			return "", err
		}
		if matches, err = aptPackagesMatching(pattern); err != nil {
			return "", err
		}
	}
	if len(matches) == 0 {
		return "", fmt.Errorf("apt knows no package matching %s", pattern)
	}
	slices.SortFunc(matches, naturalCompare)
	return matches[len(matches)-1], nil
}

func aptPackagesMatching(pattern string) ([]string, error) {
	prefix, _, _ := strings.Cut(pattern, "*")
	out, err := exec.Command("apt-cache", "pkgnames", prefix).Output()
	if err != nil {
		return nil, fmt.Errorf("apt-cache pkgnames %s: %w", prefix, err)
	}
	var matches []string
	for _, name := range strings.Fields(string(out)) {
		if ok, _ := path.Match(pattern, name); ok {
			matches = append(matches, name)
		}
	}
	return matches, nil
}

// naturalCompare orders strings with embedded numbers numerically, so
// that linux-image-6.12.117 sorts after linux-image-6.12.99.
func naturalCompare(a, b string) int {
	for a != "" && b != "" {
		var chunkA, chunkB string
		chunkA, a = leadingChunk(a)
		chunkB, b = leadingChunk(b)
		if chunkA == chunkB {
			continue
		}
		if isDigit(chunkA[0]) && isDigit(chunkB[0]) {
			chunkA, chunkB = strings.TrimLeft(chunkA, "0"), strings.TrimLeft(chunkB, "0")
			if len(chunkA) != len(chunkB) {
				return len(chunkA) - len(chunkB)
			}
		}
		return strings.Compare(chunkA, chunkB)
	}
	return len(a) - len(b)
}

// leadingChunk splits s after its leading run of digits or non-digits.
func leadingChunk(s string) (chunk, rest string) {
	i := 1
	for i < len(s) && isDigit(s[i]) == isDigit(s[0]) {
		i++
	}
	return s[:i], s[i:]
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// prepareKernel returns the kernel and the modules (with their
// dependencies) of a package, downloading and extracting it into the
// cache unless an earlier run already did.
func prepareKernel(cacheDir, pkg string, wantModules []string) (*kernel, error) {
	dir := filepath.Join(cacheDir, pkg)
	if k, err := loadExtractedKernel(dir, pkg, wantModules); err == nil {
		return k, nil
	}
	deb, err := downloadPackage(cacheDir, pkg)
	if err != nil {
		return nil, err
	}
	if err := extractKernel(deb, dir, wantModules); err != nil {
		return nil, fmt.Errorf("extract %s: %w", deb, err)
	}
	return loadExtractedKernel(dir, pkg, wantModules)
}

// downloadPackage returns the cached .deb of pkg, fetching it first if
// needed.
func downloadPackage(cacheDir, pkg string) (string, error) {
	pattern := filepath.Join(cacheDir, pkg+"_*.deb")
	if debs, _ := filepath.Glob(pattern); len(debs) > 0 {
		return debs[len(debs)-1], nil
	}
	fmt.Printf("downloading %s\n", pkg)
	download := exec.Command("apt-get", "download", pkg)
	download.Dir = cacheDir
	if err := runQuiet(download); err != nil {
		return "", err
	}
	debs, _ := filepath.Glob(pattern)
	if len(debs) == 0 {
		return "", fmt.Errorf("apt-get download %s left no %s", pkg, pattern)
	}
	return debs[len(debs)-1], nil
}

// extractKernel unpacks the package into a scratch directory and keeps
// only what the VM needs in dir:
//
//	dir/vmlinuz-RELEASE
//	dir/modules.builtin
//	dir/modules/NAME.ko   (decompressed: busybox insmod cannot read .ko.xz)
func extractKernel(deb, dir string, wantModules []string) error {
	scratch, err := os.MkdirTemp(filepath.Dir(dir), "extract-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(scratch)

	unpack := exec.Command("sh", "-c", `dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards './boot/vmlinuz-*' './lib/modules/*'`,
		"sh", deb, scratch)
	if err := runQuiet(unpack); err != nil {
		return err
	}
	vmlinuzes, _ := filepath.Glob(filepath.Join(scratch, "boot", "vmlinuz-*"))
	if len(vmlinuzes) != 1 {
		return fmt.Errorf("want one boot/vmlinuz-*, found %d", len(vmlinuzes))
	}
	release := strings.TrimPrefix(filepath.Base(vmlinuzes[0]), "vmlinuz-")
	moduleRoot := filepath.Join(scratch, "lib", "modules", release)

	if err := os.MkdirAll(filepath.Join(dir, "modules"), 0o755); err != nil {
		return err
	}
	if err := copyFile(filepath.Join(moduleRoot, "modules.builtin"), filepath.Join(dir, "modules.builtin")); err != nil {
		return err
	}
	packaged, err := indexModules(moduleRoot)
	if err != nil {
		return err
	}
	builtin, err := readBuiltinModules(filepath.Join(dir, "modules.builtin"))
	if err != nil {
		return err
	}
	// Resolving dependencies here copies each needed module into dir.
	_, err = resolveModules(wantModules, builtin, func(name string) (string, error) {
		src, ok := packaged[name]
		if !ok {
			return "", fmt.Errorf("module %s is neither in the package nor built in", name)
		}
		dst := filepath.Join(dir, "modules", name+".ko")
		return dst, decompressModule(src, dst)
	})
	if err != nil {
		return err
	}
	// Written last: its presence marks a complete extraction.
	return copyFile(vmlinuzes[0], filepath.Join(dir, "vmlinuz-"+release))
}

// loadExtractedKernel finds everything the VM needs in a directory
// written by extractKernel, or fails if anything is missing.
func loadExtractedKernel(dir, pkg string, wantModules []string) (*kernel, error) {
	vmlinuzes, _ := filepath.Glob(filepath.Join(dir, "vmlinuz-*"))
	if len(vmlinuzes) != 1 {
		return nil, errors.New("not extracted")
	}
	builtin, err := readBuiltinModules(filepath.Join(dir, "modules.builtin"))
	if err != nil {
		return nil, err
	}
	modules, err := resolveModules(wantModules, builtin, func(name string) (string, error) {
		ko := filepath.Join(dir, "modules", name+".ko")
		_, err := os.Stat(ko)
		return ko, err
	})
	if err != nil {
		return nil, err
	}
	return &kernel{
		pkg:     pkg,
		release: strings.TrimPrefix(filepath.Base(vmlinuzes[0]), "vmlinuz-"),
		vmlinuz: vmlinuzes[0],
		modules: modules,
	}, nil
}

// resolveModules returns the .ko files to insmod for the wanted modules,
// dependencies first. find returns the uncompressed .ko of a module.
func resolveModules(wanted []string, builtin map[string]bool, find func(name string) (string, error)) ([]string, error) {
	var order []string
	visited := map[string]bool{}
	var visit func(name string) error
	visit = func(name string) error {
		name = moduleName(name)
		if visited[name] || builtin[name] {
			return nil
		}
		visited[name] = true
		ko, err := find(name)
		if err != nil {
			return err
		}
		deps, err := moduleDependencies(ko)
		if err != nil {
			return err
		}
		for _, dep := range deps {
			if err := visit(dep); err != nil {
				return err
			}
		}
		order = append(order, ko)
		return nil
	}
	for _, name := range wanted {
		if err := visit(name); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// moduleDependencies reads the "depends=" entry of a module's .modinfo
// section. Debian packages ship no modules.dep (depmod writes it at
// install time), but each module names its own dependencies.
func moduleDependencies(ko string) ([]string, error) {
	f, err := elf.Open(ko)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	section := f.Section(".modinfo")
	if section == nil {
		return nil, fmt.Errorf("%s has no .modinfo section", ko)
	}
	info, err := section.Data()
	if err != nil {
		return nil, err
	}
	for _, entry := range bytes.Split(info, []byte{0}) {
		if deps, ok := bytes.CutPrefix(entry, []byte("depends=")); ok && len(deps) > 0 {
			return strings.Split(string(deps), ","), nil
		}
	}
	return nil, nil
}

// moduleName turns a file name or alias into the kernel's module name,
// which uses '_' where file names may use '-'.
func moduleName(s string) string {
	s = filepath.Base(s)
	if i := strings.Index(s, ".ko"); i >= 0 {
		s = s[:i]
	}
	return strings.ReplaceAll(s, "-", "_")
}

// indexModules maps module names to their (possibly compressed) files.
func indexModules(root string) (map[string]string, error) {
	index := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.Contains(d.Name(), ".ko") {
			index[moduleName(d.Name())] = p
		}
		return err
	})
	return index, err
}

func readBuiltinModules(file string) (map[string]bool, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	builtin := map[string]bool{}
	lines := bufio.NewScanner(f)
	for lines.Scan() {
		builtin[moduleName(lines.Text())] = true
	}
	return builtin, lines.Err()
}

func decompressModule(src, dst string) error {
	switch {
	case strings.HasSuffix(src, ".ko"):
		return copyFile(src, dst)
	case strings.HasSuffix(src, ".ko.xz"):
		out, err := exec.Command("xz", "-dc", src).Output()
		if err != nil {
			return fmt.Errorf("xz -dc %s: %w", src, err)
		}
		return writeFileAtomic(dst, bytes.NewReader(out))
	default:
		return fmt.Errorf("%s: unsupported module compression", src)
	}
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	return writeFileAtomic(dst, in)
}

// writeFileAtomic writes via a temporary file so an interrupted run never
// leaves a truncated file in the cache.
func writeFileAtomic(dst string, r io.Reader) error {
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".tmp-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, r); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil { // CreateTemp makes it 0600
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), dst)
}

// isStatic reports whether an ELF executable needs no dynamic loader.
func isStatic(file string) (bool, error) {
	f, err := elf.Open(file)
	if err != nil {
		return false, err
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return false, nil
		}
	}
	return true, nil
}

// runQuiet runs a command and includes its output in the error if it
// fails.
func runQuiet(cmd *exec.Cmd) error {
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w\n%s", strings.Join(cmd.Args, " "), err, out)
	}
	return nil
}
