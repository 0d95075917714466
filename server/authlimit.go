package server

import (
	"errors"

	"github.com/esro-emsdp/emsdp/server/internal/authlimit"
)

// authLimits are the failed-authentication limits the emsd.*auth_* keys
// set (server/internal/authlimit).
func (c EMSDConfig) authLimits() authlimit.Limits {
	return authlimit.Limits{SourceBurst: c.AuthFailuresBurst, SourceRate: c.AuthFailuresRate,
		DeviceBurst: c.DeviceAuthFailuresBurst, DeviceRate: c.DeviceAuthFailuresRate,
		Tracked: c.AuthFailuresTracked, Queue: c.AuthQueue, Workers: c.AuthWorkers}
}

// validAuthLimits checks the emsd.*auth_failures* keys.
func (c *Config) validAuthLimits() error {
	var errs []error
	for _, l := range []struct {
		name  string
		burst int
		rate  float64
	}{
		{"emsd.auth_failures", c.EMSD.AuthFailuresBurst, c.EMSD.AuthFailuresRate},
		{"emsd.device_auth_failures", c.EMSD.DeviceAuthFailuresBurst, c.EMSD.DeviceAuthFailuresRate},
	} {
		if l.burst < 0 || l.burst > authlimit.MaxBurst {
			errs = append(errs, configErr("%s_burst %d: want 0 (off) to %d", l.name, l.burst, authlimit.MaxBurst))
		}
		if !(l.rate >= authlimit.MinRate && l.rate <= authlimit.MaxRate) { // NaN too
			errs = append(errs, configErr("%s_rate %v: want %v to %v failures a minute", l.name, l.rate, authlimit.MinRate, authlimit.MaxRate))
		}
	}
	if n := c.EMSD.AuthQueue; n < 1 || n > authlimit.MaxQueue {
		errs = append(errs, configErr("emsd.auth_queue %d: want 1 to %d", n, authlimit.MaxQueue))
	}
	if n := c.EMSD.AuthWorkers; n < 0 || n > authlimit.MaxWorkers {
		errs = append(errs, configErr("emsd.auth_workers %d: want 0 (one less than the CPUs) to %d", n, authlimit.MaxWorkers))
	}
	if n := c.EMSD.AuthFailuresTracked; n < 1 || n > authlimit.MaxTracked {
		errs = append(errs, configErr("emsd.auth_failures_tracked %d: want 1 to %d", n, authlimit.MaxTracked))
	}
	return errors.Join(errs...)
}
