"""Synthetic hotel-booking data: the same columns and value ranges as the real hotel
data, with a cancellation target that depends on the features (so a model can learn)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def hotel_bookings(rows: int = 20_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)

    def ints(values, p, n=rows):
        return rng.choice(values, size=n, p=np.asarray(p) / np.sum(p))

    adults = ints([0, 1, 2, 3, 4], [1, 20, 70, 8, 1])
    children = ints([0, 1, 2, 3, 9], [90, 6, 3.8, 0.19, 0.01])
    weekend = np.minimum(rng.poisson(0.9, rows), 7)
    week = np.minimum(rng.poisson(2.4, rows), 17)
    meal = ints([0, 1, 2, 3], [78, 11, 10.9, 0.1])
    parking = (rng.random(rows) < 0.025).astype(int)
    room = ints(range(7), [78, 0.5, 14, 1.5, 4, 1, 1])
    lead = np.minimum(rng.gamma(1.3, 80, rows).astype(int), 443)
    year = ints([2017, 2018], [15, 85])
    month = rng.integers(1, 13, rows)
    date = rng.integers(1, 32, rows)
    segment = ints(range(5), [1, 1, 35, 62, 1])
    repeated = (rng.random(rows) < 0.03).astype(int)
    prev_cancel = np.where(repeated == 1, rng.poisson(0.5, rows), 0).clip(0, 13)
    prev_ok = np.where(repeated == 1, rng.poisson(4, rows), 0).clip(0, 58)
    price = np.round(np.clip(rng.normal(104, 35, rows) + 12 * children + 15 * (room > 0), 0,
                             540), 2)
    requests = np.minimum(rng.poisson(0.57, rows), 5)

    # Cancellation: long lead times, high prices, online bookings cancel more;
    # special requests, parking and loyal guests cancel less.
    logit = (-1.9 + 0.009 * lead + 0.012 * (price - 104) + 0.9 * (segment == 3)
             - 0.9 * requests - 2.0 * parking - 1.5 * repeated + 0.6 * (year == 2018)
             + 0.15 * week - 0.3 * (meal == 2))
    status = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)

    return pd.DataFrame({
        "id": np.arange(rows),
        "no_of_adults": adults,
        "no_of_children": children,
        "no_of_weekend_nights": weekend,
        "no_of_week_nights": week,
        "type_of_meal_plan": meal,
        "required_car_parking_space": parking,
        "room_type_reserved": room,
        "lead_time": lead,
        "arrival_year": year,
        "arrival_month": month,
        "arrival_date": date,
        "market_segment_type": segment,
        "repeated_guest": repeated,
        "no_of_previous_cancellations": prev_cancel,
        "no_of_previous_bookings_not_canceled": prev_ok,
        "avg_price_per_room": price,
        "no_of_special_requests": requests,
        "booking_status": status,
    })


# Datasets that have demo data, by dataset name.
GENERATORS = {"hotel_bookings": hotel_bookings}
