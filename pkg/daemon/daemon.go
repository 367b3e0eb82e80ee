// Package daemon is `sockredir daemon`: it brings the datapath up, keeps its
// local addresses current as addresses and network namespaces come and go,
// puts connections whose readers fall behind back on TCP and hands settled
// ones back to plain TCP (datapath.Maintainer),
// serves Prometheus metrics, reloads on request, and on exit leaves the
// datapath pinned unless told to take it down.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"

	"github.com/sockredir/sockredir/pkg/datapath"
	"github.com/sockredir/sockredir/pkg/hostfs"
	"github.com/sockredir/sockredir/pkg/localaddr"
	"github.com/sockredir/sockredir/pkg/metrics"
	"github.com/sockredir/sockredir/pkg/policy"
)

// Options say what the daemon runs and how.
type Options struct {
	// Base is the datapath configuration from the command line.
	Base datapath.Config
	// ConfigFile, when set, is the policy file (docs/policy.md), read at
	// start and on every reload.
	ConfigFile string
	// MetricsAddr is where to serve /metrics and /healthz; empty means nowhere.
	MetricsAddr string
	// Rescan is how often to look for network namespaces that came or went
	// in the cgroup; 0 means localaddr.DefaultRescan.
	Rescan time.Duration
	// DownOnExit takes the datapath down when the daemon stops; otherwise
	// it stays attached and pinned.
	DownOnExit bool
	// DrainTimeout is DownOnExit's datapath.DownOptions.DrainTimeout.
	DrainTimeout time.Duration
	// MaxBacklog is how many redirected bytes a socket may have waiting
	// before its connection goes on over TCP; 0 means
	// datapath.DefaultMaxBacklog.
	MaxBacklog uint64
	// CheckInterval is how often the accelerated sockets are checked
	// (backlogs, connections back on TCP); 0 means
	// datapath.DefaultCheckInterval.
	CheckInterval time.Duration
	// Reload makes the daemon reload for each value received (SIGHUP).
	Reload <-chan os.Signal
	// Log receives everything the daemon does; nil means no logging.
	Log *zap.Logger
}

// checkDurations rejects negative durations before anything is attached:
// a ticker would panic on them once the datapath is up.
func (o Options) checkDurations() error {
	for _, d := range []struct {
		flag  string
		value time.Duration
	}{
		{"--rescan-interval", o.Rescan},
		{"--drain-timeout", o.DrainTimeout},
		{"--check-interval", o.CheckInterval},
	} {
		if d.value < 0 {
			return fmt.Errorf("%s %s is negative: pass a positive duration (0 means the default)", d.flag, d.value)
		}
	}
	return nil
}

type daemon struct {
	opts    Options
	log     *zap.Logger
	cgroup  string
	pinDir  string
	tracker *localaddr.Tracker
	upkeep  *metrics.Upkeep
	// down is whether the last check found the datapath taken down, and
	// lastFailure the error of the last check, if it failed: a failure
	// that repeats is logged once (only the maintainer's goroutine uses
	// them).
	down        bool
	lastFailure string
	// datapathMu keeps Up and the tracker's address updates apart.
	datapathMu sync.Mutex
	// addrsLeftOut is the last warning that local addresses didn't fit,
	// as the tracker applies the set at every rescan (under datapathMu).
	addrsLeftOut string
}

// Run runs the daemon until ctx is done. It returns an error when the
// datapath can't be brought up at start, the metrics address can't be
// served, or the local addresses can't be followed.
func Run(ctx context.Context, opts Options) error {
	if err := opts.checkDurations(); err != nil {
		return err
	}
	d := &daemon{opts: opts, log: opts.Log, upkeep: metrics.NewUpkeep()}
	if d.log == nil {
		d.log = zap.NewNop()
	}
	cfg, err := d.config()
	if err != nil {
		return err
	}
	if cfg, err = resolve(cfg); err != nil {
		return err
	}
	d.cgroup, d.pinDir = cfg.Cgroup, cfg.PinDir
	// A metrics address that can't be served fails the start before
	// anything is attached.
	var metricsLn net.Listener
	if opts.MetricsAddr != "" {
		if metricsLn, err = net.Listen("tcp", opts.MetricsAddr); err != nil {
			return fmt.Errorf("serving metrics: %w", err)
		}
		defer metricsLn.Close() // for a start that fails; the server's shutdown closes it otherwise
	}
	if err := d.up(ctx, cfg); err != nil {
		return err
	}
	// Whatever ends the daemon from here on, --down-on-exit takes the
	// datapath down: left up without its upkeep, nothing would bound its
	// backlogs.
	return errors.Join(d.serve(ctx, metricsLn), d.exit())
}

// serve runs the upkeep, the address tracker and, on metricsLn unless it is
// nil, the metrics server, until ctx is done (nil) or one of them fails.
func (d *daemon) serve(ctx context.Context, metricsLn net.Listener) error {
	opts := d.opts
	d.tracker = localaddr.NewTracker(d.cgroup, opts.Rescan, d.setLocalAddrs, d.log)
	maintainer, err := datapath.NewMaintainer(d.pinDir, opts.MaxBacklog)
	if err != nil {
		return fmt.Errorf("preparing the datapath's upkeep: %w", err)
	}

	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	var wg sync.WaitGroup
	if metricsLn != nil {
		srv := d.serveMetrics(stop, metricsLn)
		defer func() {
			shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			srv.Shutdown(shutdownCtx)
		}()
	}
	wg.Go(func() {
		if err := d.tracker.Run(ctx); err != nil {
			stop(err)
		}
	})
	d.log.Info("daemon running", zap.String("cgroup", d.cgroup), zap.String("pin_dir", d.pinDir),
		zap.Uint64("max_backlog", maintainer.MaxBacklog()))
	wg.Go(func() { maintainer.Run(ctx, opts.CheckInterval, d.reportCheck) })

	for ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-opts.Reload:
			d.reload(ctx)
		}
	}
	wg.Wait()
	if err := context.Cause(ctx); !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// reportCheck counts and logs what one check of the upkeep did. A datapath
// that someone took down is no failure of the upkeep (healthz and the
// metrics say it is down): it is logged once, and nothing is counted until
// it is back. A failure that repeats is counted each time, logged once.
func (d *daemon) reportCheck(res datapath.CheckResult, err error) {
	wasDown := d.down
	d.down = errors.Is(err, datapath.ErrNotUp)
	if d.down {
		if !wasDown {
			d.log.Warn("the datapath was taken down: checks resume once `sockredir up` or a reload (SIGHUP) brings it back",
				zap.Error(err))
		}
		d.lastFailure = ""
		return
	}
	if res.Reopened {
		d.log.Info("the datapath was brought up again with new maps; looking after those")
	}
	d.upkeep.Checks.Inc()
	d.upkeep.Released.Add(float64(res.Released))
	d.upkeep.Aborted.Add(float64(res.Aborted))
	failure := ""
	if err != nil {
		d.upkeep.Failures.Inc()
		failure = err.Error()
	}
	if failure != d.lastFailure || res.Aborted > 0 {
		res.WarnAbout(d.log, err)
	}
	d.lastFailure = failure
	if err == nil && (res.OverBacklog > 0 || res.Released > 0) {
		d.log.Debug("checked the datapath's sockets", zap.Int("over_backlog", res.OverBacklog),
			zap.Int("released", res.Released))
	}
}

// config is Base with the config file applied.
func (d *daemon) config() (datapath.Config, error) {
	cfg := d.opts.Base
	cfg.Log = d.log
	if d.opts.ConfigFile == "" {
		return cfg, nil
	}
	p, err := policy.Load(d.opts.ConfigFile)
	if err != nil {
		return cfg, err
	}
	cfg.Policy = p
	return cfg, nil
}

// resolve fills in the defaults of the cgroup and pin directory, which the
// daemon needs to know itself.
func resolve(cfg datapath.Config) (datapath.Config, error) {
	if cfg.PinDir == "" {
		cfg.PinDir = datapath.DefaultPinDir
	}
	cgroup, err := hostfs.ResolveCgroup(cfg.Cgroup)
	cfg.Cgroup = cgroup
	return cfg, err
}

// up runs datapath.Up; ctx ends only a wait for another up or down.
func (d *daemon) up(ctx context.Context, cfg datapath.Config) error {
	d.datapathMu.Lock()
	defer d.datapathMu.Unlock()
	// Refusing to start over the size would leave what is up without its
	// upkeep (and a service manager restarting the daemon in a loop).
	cfg.KeepMapSize = true
	_, err := datapath.UpContext(ctx, cfg)
	return err
}

func (d *daemon) setLocalAddrs(addrs []netip.Addr) error {
	d.datapathMu.Lock()
	defer d.datapathMu.Unlock()
	err := datapath.SetLocalAddrs(d.pinDir, addrs)
	switch {
	case errors.Is(err, datapath.ErrLocalAddrsFull):
		if err.Error() != d.addrsLeftOut {
			d.log.Warn("not every local address is accelerated", zap.Error(err))
			d.addrsLeftOut = err.Error()
		}
		return nil // the addresses that fit are in place: nothing to try again
	case err == nil:
		d.addrsLeftOut = ""
	case errors.Is(err, datapath.ErrNotUp):
		// Taken down (the upkeep says so, once): the tracker's next
		// rescan after an up puts the addresses in.
		return nil
	}
	return err
}

// reload reads the configuration again and runs Up with it, which keeps the
// programs when they are this build's, puts a changed policy in place, brings the
// datapath back if someone took it down, and upgrades it in place after a
// new build was installed. Then the local addresses are listed afresh. A
// failed reload leaves what runs as it was.
func (d *daemon) reload(ctx context.Context) {
	d.log.Info("reloading")
	cfg, err := d.config()
	if err == nil {
		cfg, err = resolve(cfg)
	}
	if err == nil && (cfg.Cgroup != d.cgroup || cfg.PinDir != d.pinDir) {
		err = fmt.Errorf("the cgroup and pin directory can't change on reload (running with %s and %s): restart the daemon",
			d.cgroup, d.pinDir)
	}
	if err == nil {
		err = d.up(ctx, cfg)
	}
	if err != nil {
		d.log.Error("reload failed; carrying on as before", zap.Error(err))
		return
	}
	d.tracker.Resync()
	d.log.Info("reloaded")
}

// serveMetrics starts serving /metrics and /healthz; a server that fails
// later stops the daemon through stop.
func (d *daemon) serveMetrics(stop context.CancelCauseFunc, ln net.Listener) *http.Server {
	reg := prometheus.NewRegistry()
	reg.MustRegister(metrics.NewCollector(d.pinDir),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(metrics.TrackerGauges(d.tracker)...)
	reg.MustRegister(d.upkeep.Collectors()...)
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", metrics.Handler(reg, d.log))
	mux.HandleFunc("GET /healthz", d.healthz)

	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			stop(fmt.Errorf("serving metrics: %w", err))
		}
	}()
	d.log.Info("serving metrics", zap.String("addr", ln.Addr().String()))
	return srv
}

// healthz answers 200 while the datapath is attached, 503 otherwise.
func (d *daemon) healthz(w http.ResponseWriter, _ *http.Request) {
	u, err := datapath.ReadUsage(d.pinDir)
	switch {
	case err != nil:
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
	case !u.Up:
		http.Error(w, "the datapath is not attached to its cgroup", http.StatusServiceUnavailable)
	default:
		fmt.Fprintln(w, "ok")
	}
}

// exit leaves the datapath in place, or takes it down with DownOnExit.
func (d *daemon) exit() error {
	if !d.opts.DownOnExit {
		d.log.Info("stopping; acceleration stays in place (`sockredir down` removes it)",
			zap.String("pin_dir", d.pinDir))
		return nil
	}
	d.log.Info("stopping and taking the datapath down")
	_, err := datapath.Down(datapath.DownOptions{PinDir: d.pinDir, DrainTimeout: d.opts.DrainTimeout, Log: d.log})
	return err
}
