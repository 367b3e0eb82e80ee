package main

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// The deployment files are checked offline: the Kubernetes manifests by
// strict decoding into the API's own types (an unknown or misspelled field
// fails), and every command line in them by parsing it with this CLI.

const deployDir = "../../deploy"

// decodeStrict decodes a one-object manifest, refusing unknown fields.
func decodeStrict(t *testing.T, file string, into any) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(deployDir, "kubernetes", file))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(data, into); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

// parseCommandLine parses args ("daemon", flags...) as sockredir would.
func parseCommandLine(t *testing.T, args []string) {
	t.Helper()
	root := newRootCommand()
	cmd, rest, err := root.Find(args)
	if err != nil || cmd == root {
		t.Fatalf("%q: no such sockredir command: %v", args, err)
	}
	if err := cmd.ParseFlags(rest); err != nil {
		t.Errorf("%q: %v", args, err)
	}
	if err := cmd.ValidateArgs(cmd.Flags().Args()); err != nil {
		t.Errorf("%q: %v", args, err)
	}
}

func TestKubernetesManifests(t *testing.T) {
	var ns corev1.Namespace
	decodeStrict(t, "namespace.yaml", &ns)
	var sa corev1.ServiceAccount
	decodeStrict(t, "serviceaccount.yaml", &sa)
	var ds appsv1.DaemonSet
	decodeStrict(t, "daemonset.yaml", &ds)

	if ns.Kind != "Namespace" || sa.Kind != "ServiceAccount" || ds.Kind != "DaemonSet" {
		t.Fatalf("kinds: %q, %q, %q", ns.Kind, sa.Kind, ds.Kind)
	}
	if sa.Namespace != ns.Name || ds.Namespace != ns.Name || ds.Spec.Template.Spec.ServiceAccountName != sa.Name {
		t.Errorf("namespace %q, service account %q/%q, daemonset %q using %q: they must match",
			ns.Name, sa.Namespace, sa.Name, ds.Namespace, ds.Spec.Template.Spec.ServiceAccountName)
	}
	if got, want := ds.Spec.Selector.MatchLabels, ds.Spec.Template.Labels; !mapsSubset(got, want) {
		t.Errorf("the selector %v does not select the pods' labels %v", got, want)
	}

	pod := ds.Spec.Template.Spec
	if !pod.HostNetwork || !pod.HostPID {
		t.Error("the daemon needs hostNetwork and hostPID")
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("want one container, got %d", len(pod.Containers))
	}
	c := pod.Containers[0]
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = "192.0.2.1" // a node address stands in for every downward-API value
	}
	var args []string
	for _, a := range c.Args {
		args = append(args, os.Expand(strings.ReplaceAll(a, "$(", "${"), func(k string) string { return env[k] }))
	}
	if len(args) == 0 || args[0] != "daemon" {
		t.Fatalf("the container must run `sockredir daemon`, not %q", args)
	}
	parseCommandLine(t, args)

	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil || (sc.Privileged != nil && *sc.Privileged) {
		t.Fatal("the container must be unprivileged with explicit capabilities")
	}
	var added []string
	for _, capability := range sc.Capabilities.Add {
		added = append(added, string(capability))
	}
	slices.Sort(added)
	if !slices.Equal(added, []string{"NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}) || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("capabilities: drop %v, add %v; want drop ALL, add NET_ADMIN, SYS_ADMIN and SYS_PTRACE", sc.Capabilities.Drop, added)
	}
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		t.Error("allowPrivilegeEscalation: false is refused by the API together with CAP_SYS_ADMIN")
	}

	mounted := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounted[m.Name] = m.MountPath
	}
	for _, v := range pod.Volumes {
		if v.HostPath == nil {
			t.Errorf("volume %s: want only hostPath volumes", v.Name)
		} else if mounted[v.Name] == "" {
			t.Errorf("volume %s is never mounted", v.Name)
		}
	}
	cgroupArg := slices.IndexFunc(args, func(a string) bool { return strings.HasPrefix(a, "--cgroup=") })
	if cgroupArg < 0 || !strings.HasPrefix(strings.TrimPrefix(args[cgroupArg], "--cgroup="), mounted["cgroup"]+"/") {
		t.Errorf("--cgroup must be below the mounted host cgroup hierarchy %s: %q", mounted["cgroup"], args)
	}
	if mounted["bpffs"] != "/sys/fs/bpf" {
		t.Errorf("the host's BPF filesystem must be mounted at /sys/fs/bpf, not %q", mounted["bpffs"])
	}
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Port.StrVal != c.Ports[0].Name {
		t.Error("the readiness probe must ask /healthz on the metrics port")
	}
}

func mapsSubset(sub, of map[string]string) bool {
	for k, v := range sub {
		if of[k] != v {
			return false
		}
	}
	return len(sub) > 0
}

// unitFile reads a systemd unit's Key=Value lines by section.
func unitFile(t *testing.T, path string) map[string]map[string][]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	unit := map[string]map[string][]string{}
	section := ""
	s := bufio.NewScanner(bytes.NewReader(data))
	for s.Scan() {
		line := strings.TrimSpace(s.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
			unit[section] = map[string][]string{}
		default:
			key, value, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s: malformed line %q", path, line)
			}
			unit[section][key] = append(unit[section][key], value)
		}
	}
	return unit
}

func TestSystemdUnit(t *testing.T) {
	unit := unitFile(t, filepath.Join(deployDir, "systemd", "sockredir.service"))
	service := unit["Service"]
	if len(service["ExecStart"]) != 1 {
		t.Fatalf("want one ExecStart, got %q", service["ExecStart"])
	}
	exec := strings.Fields(service["ExecStart"][0])
	if exec[0] != "/usr/local/bin/sockredir" {
		t.Errorf("ExecStart runs %s, not /usr/local/bin/sockredir", exec[0])
	}
	parseCommandLine(t, exec[1:])
	if exec[1] != "daemon" {
		t.Errorf("the service must run `sockredir daemon`: %q", exec)
	}
	if got := service["CapabilityBoundingSet"]; !slices.Equal(got, []string{"CAP_SYS_ADMIN CAP_NET_ADMIN CAP_SYS_PTRACE"}) {
		t.Errorf("CapabilityBoundingSet=%q, want the DaemonSet's three capabilities", got)
	}
	if got := service["RestrictNamespaces"]; !slices.Equal(got, []string{"net"}) {
		t.Errorf("RestrictNamespaces=%q: the daemon enters network namespaces, so it must allow net", got)
	}
	if unit["Install"]["WantedBy"] == nil {
		t.Error("no [Install] WantedBy: `systemctl enable` would do nothing")
	}
}

func TestDockerfile(t *testing.T) {
	data, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	df := string(data)
	for _, want := range []string{"CGO_ENABLED=0", "./cmd/sockredir", "FROM scratch",
		"COPY --from=build /out/sockredir /usr/local/bin/sockredir", `ENTRYPOINT ["/usr/local/bin/sockredir"]`} {
		if !strings.Contains(df, want) {
			t.Errorf("the Dockerfile has no %q", want)
		}
	}
	for _, download := range []string{"curl ", "wget ", "ADD http"} {
		if strings.Contains(df, download) {
			t.Errorf("the Dockerfile downloads with %q: only the Go module proxy is allowed", download)
		}
	}
}

// Strict decoding is what makes the manifest test worth having: a
// misspelled field must fail it.
func TestStrictDecodingCatchesTypos(t *testing.T) {
	var ds appsv1.DaemonSet
	manifest := "apiVersion: apps/v1\nkind: DaemonSet\nspec:\n  template:\n    spec:\n      hostNetwrk: true\n"
	if err := yaml.UnmarshalStrict([]byte(manifest), &ds); err == nil {
		t.Fatal("a misspelled field was accepted")
	}
}
