/*
 * error.c: the calling thread's last error, for qb_last_error().
 */
#include <stdarg.h>
#include <stdio.h>

#include "qb.h"

static __thread char last_msg[512];
static __thread int last_kind;

/* Record a message and a kind; returns -err so callers can `return qb_err()`. */
int qb_err(int err, int kind, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(last_msg, sizeof(last_msg), fmt, ap);
	va_end(ap);
	last_kind = kind;
	return -err;
}

void qb_err_clear(void)
{
	last_msg[0] = 0;
	last_kind = QB_ERR_OTHER;
}

const char *qb_last_error(void)
{
	return last_msg;
}

int qb_last_error_kind(void)
{
	return last_kind;
}
