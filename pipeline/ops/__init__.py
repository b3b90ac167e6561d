"""Operations around a run: starting Ray and sizing resources (runtime), the pre-flight
resource check (preflight), stall detection with stack dumps (watchdog)."""
