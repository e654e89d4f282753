"""Window math and the limiter: admit with a reservation, settle with the actual usage."""
